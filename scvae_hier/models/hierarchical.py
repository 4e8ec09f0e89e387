"""What the two hierarchical models share: level sizes, the marginal-usage weight, and the
training objective built from per-level terms.

Objective (minimised): -reconstruction + beta * (KL_z + mean over levels of KL_y_l)
                       + lambda * sum_l KL(mean-over-batch q(y_l|x) || target_l),
with target_l uniform by default or the model's own marginal p(y_l) (the poster's choice, which a
learnable prior can satisfy by collapsing along with q).
Reported ELBO: reconstruction - KL_z - sum_l KL_y_l, the true bound (beta = 1, no averaging,
no penalty), comparable across models.

Partial labels (`semi_supervised`, models.supervision): level l's classes are the hierarchy's,
in its order; a labelled cell's q(y_l|x) is restricted to the classes its labels allow, and the
predictions are the tree path with the most posterior mass, so they nest.
"""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import tensorflow as tf

from ..choices import USAGE_TARGETS, check_choice
from ..tree_shape import check_parents, default_parents
from .base import BaseVAE
from .paths import perplexity, usage_kl
from .supervision import level_masks, most_probable_path, supervision_arguments



class HierarchicalVAE(BaseVAE):
    """Base for IndMoMVAE and MoMixVAE: one clustering per hierarchy level."""

    clustering = "levels"

    @classmethod
    def arguments_from(cls, options, hierarchy) -> dict:
        if hierarchy is None and not options.level_sizes:
            raise ValueError(f"--model {options.model} needs a hierarchy (--hierarchy, --levels, or the data's "
                             f"uns['hierarchy']) or --level-sizes.")
        sizes = list(options.level_sizes or hierarchy.sizes)
        if hierarchy is not None and len(sizes) != hierarchy.n_levels:
            raise ValueError(f"--level-sizes gives {len(sizes)} levels but the hierarchy has {hierarchy.n_levels} "
                             f"({', '.join(hierarchy.levels)}); give one size per level.")
        weights = list(options.usage_level_weights) if options.usage_level_weights else None
        arguments = dict(level_sizes=sizes, prior=options.prior, marginal_usage=options.marginal_usage,
                         usage_target=options.usage_target, usage_level_weights=weights)
        supervised = supervision_arguments(options, hierarchy)
        if supervised and sizes != list(hierarchy.sizes):
            raise ValueError(f"With labels, --model {options.model}'s classes are the hierarchy's ({hierarchy.sizes} "
                             f"per level); leave out --level-sizes (--model tree --novel-classes adds classes "
                             f"for types nobody labelled).")
        return dict(arguments, **supervised)

    def __init__(self, n_genes, level_sizes=(2, 4, 5, 9), prior="normal", marginal_usage=1.0, usage_target="uniform",
                 usage_level_weights=None, **kwargs):
        super().__init__(n_genes, **kwargs)
        sizes = [int(k) for k in level_sizes]
        if not sizes:
            raise ValueError("A hierarchical model needs at least one level.")
        single = [i + 1 for i, k in enumerate(sizes) if k < 2]
        if single:
            raise ValueError(f"Level(s) {single} have fewer than 2 classes ({sizes}); a level with one class "
                             f"carries no clustering. Drop it from the hierarchy or use --level-sizes.")
        check_choice("usage target", usage_target, USAGE_TARGETS)
        self.usage_target = usage_target
        # Per-level multipliers of the usage KL: a uniform target is wrong for coarse levels whose
        # true classes are unbalanced (Stem is 9% of the cells), but needed against collapse at fine ones.
        weights = [1.0] * len(sizes) if usage_level_weights is None else [float(w) for w in usage_level_weights]
        if len(weights) != len(sizes) or min(weights) < 0:
            raise ValueError(f"usage_level_weights needs one non-negative weight per level ({len(sizes)}), "
                             f"got {list(usage_level_weights)}.")
        self.usage_level_weights = tuple(weights)
        self.level_sizes = tuple(sizes)
        self.n_levels = len(sizes)
        self.prior_law = prior
        self.marginal_usage = float(marginal_usage)
        # lambda(t): set each epoch by the training schedule; starts at the configured value.
        self.usage_weight = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.marginal_usage),
                                            trainable=False, name="usage_weight")
        levels = range(1, self.n_levels + 1)
        self.term_names = ("loss", "elbo", "reconstruction", "kl_z", "kl_y", "marginal_usage",
                           *(f"kl_y_{l}" for l in levels), *(f"components_used_{l}" for l in levels))

    def _init_level_supervision(self, parents=None, semi_supervised=False, label_weight=5.0):
        """With labels, the tree of the classes (parents[l - 1]: the parent of each class of level
        l; default an even split) and the classification term. Without labels the levels need not
        form a tree (any --level-sizes). Call before `_init_trackers`."""
        self.parents = None
        if parents is not None or semi_supervised:
            self.parents = [[int(p) for p in links] for links in (parents or default_parents(self.level_sizes))]
            check_parents(self.parents, self.level_sizes)
        self._init_supervision(semi_supervised, label_weight)

    def label_level_masks(self, labels):
        """Per level, the [B, K_l] log-mask of the classes a cell's labels allow (all if unlabelled)."""
        return level_masks(labels, self.parents, self.level_sizes)

    def level_predictions(self, level_probabilities, labels=None):
        """Without labels the poster's rule, each level's argmax on its own; a semi-supervised
        model's classes are the hierarchy's, so it predicts the tree path with the largest
        sum of log q(y_l|x), among those a labelled cell's labels allow: nested for every cell."""
        if not self.semi_supervised:
            return super().level_predictions(level_probabilities)
        return most_probable_path(level_probabilities, self.parents, labels)

    def combine(self, reconstruction, kl_z, kl_y, kl_y_objective, level_kls, log_q_marginals,
                log_p_marginals) -> dict:
        """Per-cell loss and reported terms from per-level pieces. `kl_y` enters the reported
        ELBO, `kl_y_objective` the loss (e.g. the level-averaged KL of MoMixVAE)."""
        if self.usage_target == "uniform":  # a learnable p(y_l) can collapse together with q
            log_p_marginals = self.uniform_usage_targets()
        usage = tf.add_n([w * usage_kl(q, p)
                          for w, q, p in zip(self.usage_level_weights, log_q_marginals, log_p_marginals)])
        loss = -reconstruction + self.kl_weight * (kl_z + kl_y_objective) + self.usage_weight * usage
        terms = {"loss": loss, "elbo": reconstruction - kl_z - kl_y, "reconstruction": reconstruction,
                 "kl_z": kl_z, "kl_y": kl_y, "marginal_usage": usage}
        for level, (kl, q) in enumerate(zip(level_kls, log_q_marginals), start=1):
            terms[f"kl_y_{level}"] = kl
            terms[f"components_used_{level}"] = perplexity(q)
        return terms

    def uniform_usage_targets(self):
        """log targets [K_l] per level of the usage KL with usage_target="uniform": every class alike."""
        return [-tf.math.log(float(k)) + tf.zeros((k,)) for k in self.level_sizes]

    def get_config(self):
        return {**super().get_config(), "level_sizes": list(self.level_sizes), "prior": self.prior_law,
                "marginal_usage": self.marginal_usage, "usage_target": self.usage_target,
                "usage_level_weights": list(self.usage_level_weights), "parents": self.parents,
                "semi_supervised": self.semi_supervised, "label_weight": self.label_weight}
