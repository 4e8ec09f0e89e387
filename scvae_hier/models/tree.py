"""TreeVAE: a mixture over the leaves of the user's hierarchy, read at every level by summing.

Generative model: p(x, z, c) = p(x|z) p(z|c) p(c), with c one of M prior components. Every
component belongs to one leaf (finest class) of the hierarchy, and through the hierarchy's
parent structure to exactly one class at every coarser level, so a coarse class is the union of
its leaves: q(y_l = k | x) = sum of q(c|x) over the components under k. Per-level predictions
are the ancestors of the cell's most probable leaf (`path_predictions`), a path of the tree for
every cell by construction.

Component means are tree-structured, mu_c = sum_l 2^-(l-1) delta_l[ancestor_l(c)] (plus a
per-component offset when a leaf has several components), so siblings share their ancestors'
offsets and start close together.

Posterior: one Gaussian q(z|x) (one decoder pass per cell, like a plain VAE) and the cluster
posterior that is optimal for it, q(c|x) = softmax_c(log p(c) - KL(q(z|x) || p(z|c))) for
Normal components (analytic), or the component posterior p(c|z) at the sampled z for Student-t
components (then the ELBO is the one of the marginal mixture prior). The clusters are therefore
regions of the latent space itself, where a graph clustering of the latent finds the cell types,
instead of the output of a separate y-encoder that can disagree with the latent's geometry.
ELBO = E_q log p(x|z) - sum_c q(c|x) KL(q(z|x) || p(z|c)) - KL(q(c|x) || p(c)), exact in c.

Re-seeding: at the start of each epoch in `reseed_epochs` (once the latent has formed), the components are set from a clustering of the
training cells' latent means: k-means into `reseed_clusters` clusters per leaf (by default 4
without labels, 2 with them), the clusters
assigned to leaves so that the hierarchy's classes at every level are as compact as possible in
the latent (`assign_to_tree`), and each leaf split again into its components. The leaves are
then re-placed in the tree (`place_leaves`, `leaf_placement="graph"`; with labels, only those the
labels leave free): the top level
still by compactness, every level below so that its classes are well-connected regions of the
latent's nearest-neighbour graph. Compactness alone put naive CD4 and naive CD8 T cells under one
class on PBMC, and split a level-2 lineage on Kang (fold 3); the graph alone
cannot place a type that links to nothing (analyses/tuning/tree/NOTES.md). The final refit
after training does the same with `final_refit_clusters` per leaf (by default 4 without labels:
finer pieces let a small, separate type such as 0.8% megakaryocytes get its own piece instead of
a half of a big class; with labels, `reseed_clusters`, the setting the partial-label results were
measured with), and it groups the clusters into leaves with the coarse levels counting more
(`grouping_decay`; with labels, their penalty in every step), as long as the leaves stay nearly
as compact: equal weights let a big type split over several leaves push a small one into the
wrong lineage (Kang). The top level's
classes are fixed first, with a stronger decay (`top_level_decay`): the lineages need it, the
finer levels lose by it. The final refit's placement splits the top level by average linkage
(`top_level_split`), which sets the most distant leaves apart whatever their size.
The clustering itself (grouping, placement, markers) is `scvae_hier.tree_clustering`; this module
is the model. It adds its `TreeReseeding` callback itself when fitted on `CountBatches`, so
training needs no special wiring.
"""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import numpy as np
import tensorflow as tf

from ..choices import (DEFAULT_GROUPING_DECAY, DEFAULT_TOP_LEVEL_DECAY, DEFAULT_TOP_LEVEL_SPLIT, LEAF_PLACEMENTS,
                       PRIOR_LAWS, PRIOR_PROBABILITIES, TOP_LEVEL_SPLITS, check_choice)
from ..distributions import mixture_prior
from ..labels import allowed_components
from ..markers import scores as cell_marker_scores
from ..tree_clustering import (label_conflicts, marker_sides, match_to_tree, nearest_other_grouping, prune_leaves,
                               regrouped_leaves, tree_clustering)
from ..tree_shape import TREE_SHRINK, check_parents, default_parents, leaf_ancestors
from .hierarchical import HierarchicalVAE
from .layers import ComponentLaw, DenseStack, GaussianHead, _inverse_softplus
from .mixture import mixture_log_weights, mixture_terms
from .supervision import (class_log_marginals, component_level_masks, hierarchy_parents, label_log_mask,
                          path_predictions, restrict)


EMPTY_WEIGHT = 1e-12    # prior weight of an empty leaf's components (exactly 0 would make log p(c) -inf)


# ------------------------------------------------------------------------------ components
@keras.saving.register_keras_serializable("scvae_hier")
class TreePathComponents(ComponentLaw, keras.layers.Layer):
    """M components p(z|c), each under one leaf, located at a sum of its ancestors' offsets:
    mu_c = sum_l TREE_SHRINK^(l-1) delta_l[ancestor_l(c)] (+ TREE_SHRINK^L delta_c when leaves
    hold several components); scale (and Student-t df) per component."""

    def __init__(self, ancestors, latent_dim, law="normal", **kwargs):
        super().__init__(**kwargs)
        self.ancestors = [[int(a) for a in row] for row in ancestors]   # [L, M]: class at each level
        self.latent_dim = int(latent_dim)
        self.law = law
        self.n_components = len(self.ancestors[-1])
        sizes = [max(row) + 1 for row in self.ancestors]
        self.offsets = [self.add_weight(shape=(k, self.latent_dim), initializer=keras.initializers.RandomNormal(stddev=1.0),
                                        name=f"level_{level + 1}_offsets") for level, k in enumerate(sizes)]
        self.own = None
        if self.n_components > sizes[-1]:  # several components per leaf: one more offset each
            self.own = self.add_weight(shape=(self.n_components, self.latent_dim),
                                       initializer=keras.initializers.RandomNormal(stddev=0.1), name="component_offsets")
        full = (self.n_components, self.latent_dim)
        self.raw_scale = self.add_weight(shape=full, initializer=keras.initializers.Constant(_inverse_softplus(1.0)),
                                         name="raw_scale")
        if law == "student-t":
            self.raw_df = self.add_weight(shape=(self.n_components, 1),
                                          initializer=keras.initializers.Constant(_inverse_softplus(4.0)), name="raw_df")

    @property
    def loc(self):
        terms = [TREE_SHRINK ** level * tf.gather(offset, row)
                 for level, (offset, row) in enumerate(zip(self.offsets, self.ancestors))]
        if self.own is not None:
            terms.append(TREE_SHRINK ** len(self.offsets) * self.own)
        return tf.add_n(terms)

    def set_from_points(self, latent, component, scales=None):
        """Set every offset so that each component sits at the mean of its points (a class's offset
        is its mean minus its parent's mean), and scales at their spread. Components without
        points keep their leaf's (or parent's) mean plus their current own offset (which also breaks
        the tie between the components of a leaf). `scales` [M, D] overrides the spreads."""
        latent = np.asarray(latent, dtype="float64")
        component = np.asarray(component, dtype=int)
        parent_means = np.zeros((1, self.latent_dim))  # level-1 offsets are their classes' means
        parent_of = np.zeros(self.n_components, dtype=int)
        for level, (offset, row) in enumerate(zip(self.offsets, self.ancestors)):
            row = np.asarray(row)
            node_of_point = row[component]
            k = offset.shape[0]
            means = np.array([latent[node_of_point == j].mean(axis=0) if (node_of_point == j).any()
                              else parent_means[parent_of[row == j][0]] for j in range(k)])
            parents_here = np.array([parent_of[row == j][0] for j in range(k)])
            offset.assign(((means - parent_means[parents_here]) / TREE_SHRINK ** level).astype("float32"))
            parent_means, parent_of = means, row
        spread = np.ones((self.n_components, self.latent_dim)) if scales is None else np.asarray(scales, float)
        own = None if self.own is None else self.own.numpy().astype("float64")  # empty components keep theirs
        for c in range(self.n_components):
            points = latent[component == c]
            if len(points) > 1 and scales is None:
                spread[c] = points.std(axis=0)
            if self.own is not None and len(points):
                own[c] = (points.mean(axis=0) - parent_means[parent_of[c]]) / TREE_SHRINK ** len(self.offsets)
        if self.own is not None:
            self.own.assign(own.astype("float32"))
        self.raw_scale.assign(np.log(np.expm1(np.clip(spread, 0.05, None))).astype("float32"))

    def set_moments(self, means, scales):
        """Set every offset so that component c sits at means[c] (a class's offset is the mean of its
        components' means minus its parent's), and scales [M, D]."""
        means = np.asarray(means, dtype="float64")
        parent_means, parent_of = np.zeros((1, self.latent_dim)), np.zeros(self.n_components, dtype=int)
        for level, (offset, row) in enumerate(zip(self.offsets, self.ancestors)):
            row = np.asarray(row)
            node_means = np.array([means[row == j].mean(axis=0) for j in range(offset.shape[0])])
            parents_here = np.array([parent_of[row == j][0] for j in range(offset.shape[0])])
            offset.assign(((node_means - parent_means[parents_here]) / TREE_SHRINK ** level).astype("float32"))
            parent_means, parent_of = node_means, row
        if self.own is not None:
            self.own.assign(((means - parent_means[parent_of]) / TREE_SHRINK ** len(self.offsets)).astype("float32"))
        self.raw_scale.assign(np.log(np.expm1(np.clip(scales, 1e-3, None))).astype("float32"))

    def get_config(self):
        return {**super().get_config(), "ancestors": self.ancestors, "latent_dim": self.latent_dim, "law": self.law}


# ----------------------------------------------------------------------------------- model
@keras.saving.register_keras_serializable("scvae_hier")
class TreeVAE(HierarchicalVAE):
    gives_elbo_per_count = True  # outputs() has each cell's ELBO per count and component (novelty.py)

    @classmethod
    def arguments_from(cls, options, hierarchy) -> dict:
        if hierarchy is None:
            raise ValueError("--model tree needs a hierarchy (--hierarchy, --levels, or the data's uns['hierarchy']): "
                             "its components are the hierarchy's leaves, under their classes. Without one, "
                             "--model mixture --n-components K clusters the cells into K flat clusters, or "
                             "--model momix / indmom --level-sizes K1 K2 ... learns a hierarchy of those sizes.")
        if options.level_sizes and list(options.level_sizes) != list(hierarchy.sizes):
            raise ValueError(f"--model tree takes its level sizes from the hierarchy ({hierarchy.sizes}); leave out "
                             f"--level-sizes, or use --components-per-leaf for more components than leaves.")
        parents = hierarchy_parents(hierarchy)
        arguments = super().arguments_from(options, hierarchy)
        leaves, named = list(hierarchy.classes(hierarchy.n_levels - 1)), getattr(options, "empty_leaves", ())
        unknown = [name for name in named if name not in leaves]
        if unknown:
            raise ValueError(f"--empty-leaves names {unknown}, not leaves of the hierarchy; its leaves are {leaves}.")
        empty = [leaves.index(name) for name in named]
        novel = int(getattr(options, "novel_classes", 0) or 0)
        if novel:  # an "unassigned" class at every level, holding `novel` leaves of its own
            sizes = list(arguments["level_sizes"])
            parents = [links + [sizes[level]] * (novel if level == len(parents) - 1 else 1)
                       for level, links in enumerate(parents)]
            arguments["level_sizes"] = [k + 1 for k in sizes[:-1]] + [sizes[-1] + novel]
        # semi_supervised and label_weight come with `arguments` (supervision_arguments) when labelled.
        return dict(arguments, parents=parents, novel_classes=novel,
                    components_per_leaf=options.components_per_leaf,
                    prior_probabilities=options.prior_probabilities, reseed_epochs=list(options.reseed_epochs or ()),
                    reseed_clusters=options.reseed_clusters, final_refit=options.final_refit,
                    final_refit_clusters=getattr(options, "final_refit_clusters", None),
                    leaf_placement=getattr(options, "leaf_placement", "graph"),
                    grouping_decay=getattr(options, "grouping_decay", DEFAULT_GROUPING_DECAY),
                    top_level_decay=getattr(options, "top_level_decay", DEFAULT_TOP_LEVEL_DECAY), empty_leaves=empty,
                    top_level_split=getattr(options, "top_level_split", DEFAULT_TOP_LEVEL_SPLIT))

    def __init__(self, n_genes, level_sizes=(2, 4, 5, 9), parents=None, components_per_leaf=1,
                 prior="normal", prior_probabilities="learnable", reseed_epochs=(5,), reseed_clusters=None, final_refit=10,
                 final_refit_clusters=None, semi_supervised=False, label_weight=5.0, novel_classes=0,
                 leaf_placement="graph", grouping_decay=DEFAULT_GROUPING_DECAY, top_level_decay=DEFAULT_TOP_LEVEL_DECAY,
                 empty_leaves=(), markers=(), top_level_split=DEFAULT_TOP_LEVEL_SPLIT, **kwargs):
        super().__init__(n_genes, level_sizes=level_sizes, prior=prior, **kwargs)
        check_choice("prior", prior, PRIOR_LAWS)
        check_choice("prior probabilities", prior_probabilities, PRIOR_PROBABILITIES)
        self.parents = [[int(p) for p in links] for links in (parents or default_parents(self.level_sizes))]
        check_parents(self.parents, self.level_sizes)
        if int(components_per_leaf) < 1:
            raise ValueError(f"components_per_leaf must be at least 1, got {components_per_leaf}.")
        self.components_per_leaf = int(components_per_leaf)
        self.prior_probabilities = prior_probabilities
        self.reseed_epochs = tuple(sorted(int(e) for e in reseed_epochs if int(e) > 0))
        # k-means pieces per leaf: without labels 4 at both re-seeds (chosen on validation cells,
        # NOTES.md); with labels 2, and the final refit follows the re-seed (the partial-label setting).
        self.reseed_clusters = int((2 if semi_supervised else 4) if reseed_clusters is None else reseed_clusters)
        self.novel_classes = int(novel_classes)
        self.leaf_placement = check_choice("leaf placement", leaf_placement, LEAF_PLACEMENTS)
        self.configure_final_refit(final_refit, final_refit_clusters, grouping_decay, top_level_decay, empty_leaves,
                                   markers, top_level_split, semi_supervised)
        n_leaves = self.level_sizes[-1]
        self.n_components = n_leaves * self.components_per_leaf
        leaf_of_component = np.repeat(np.arange(n_leaves), self.components_per_leaf)
        # [L, M]: the class of every component at every level; the last row is its leaf.
        self.component_ancestors = leaf_ancestors(self.parents, n_leaves)[:, leaf_of_component]
        self.level_masks = component_level_masks(self.component_ancestors, self.level_sizes)   # [M, K_l] each
        self.z_stack = DenseStack(self.hidden, self.normalisation, name="z_encoder")
        self.z_head = GaussianHead(self.latent_dim, name="z_head")
        self.components = TreePathComponents(self.component_ancestors.tolist(), self.latent_dim, prior,
                                             name="components")
        self.prior_logits = self.add_weight(shape=(self.n_components,), initializer="zeros",
                                            trainable=prior_probabilities == "learnable", name="prior_logits")
        self._init_supervision(semi_supervised, label_weight, weight=True)
        self._init_trackers()

    def configure_final_refit(self, final_refit=10, final_refit_clusters=None, grouping_decay=DEFAULT_GROUPING_DECAY,
                              top_level_decay=DEFAULT_TOP_LEVEL_DECAY, empty_leaves=(), markers=(),
                              top_level_split=DEFAULT_TOP_LEVEL_SPLIT, semi_supervised=None):
        """Check and set what only the final refit reads (none of it changes training), so that a
        trained model can redo its final refit with other settings (`scvae_hier.refit`)."""
        semi_supervised = getattr(self, "semi_supervised", False) if semi_supervised is None else semi_supervised
        self.final_refit = int(final_refit)
        if final_refit_clusters is None:
            final_refit_clusters = self.reseed_clusters if semi_supervised else 4
        self.final_refit_clusters = int(final_refit_clusters)
        self.top_level_split = check_choice("top-level split", top_level_split, TOP_LEVEL_SPLITS)
        for name, decay in (("grouping_decay", grouping_decay), ("top_level_decay", top_level_decay)):
            if not 0 < float(decay) <= 1:
                raise ValueError(f"{name} must be in (0, 1] (1 = no coarse-first weighting), got {decay}.")
        self.grouping_decay, self.top_level_decay = float(grouping_decay), float(top_level_decay)
        n_leaves = self.level_sizes[-1]
        self.empty_leaves = sorted({int(k) for k in empty_leaves})
        if self.empty_leaves and self.prior_probabilities != "learnable":
            raise ValueError("empty_leaves needs prior_probabilities='learnable' (an empty leaf's prior weight is "
                             "set to nearly 0); drop one or the other.")
        if self.empty_leaves and (self.empty_leaves[0] < 0 or self.empty_leaves[-1] >= n_leaves
                                  or len(self.empty_leaves) > n_leaves - 2):
            raise ValueError(f"empty_leaves must be leaf indices in 0..{n_leaves - 1} that leave at least 2 leaves; "
                             f"got {list(empty_leaves)}.")
        self.markers = [{"level": int(m["level"]), "class": int(m["class"]), "genes": [int(g) for g in m["genes"]]}
                        for m in markers]
        if self.markers and self.leaf_placement != "graph":
            raise ValueError("markers re-place the leaves after the graph placement and need leaf_placement='graph'; "
                             "drop one or the other.")
        bad = [m for m in self.markers if not (0 <= m["level"] < len(self.level_sizes)
                                               and 0 <= m["class"] < self.level_sizes[m["level"]]
                                               and m["genes"] and 0 <= min(m["genes"]) and max(m["genes"]) < self.n_genes)]
        if bad:
            raise ValueError(f"markers must name a level, a class of it and gene columns in 0..{self.n_genes - 1}; "
                             f"got {bad}.")

    # ---------------------------------------------------------------- prior and initialisation
    def log_pc(self):
        return tf.nn.log_softmax(self.prior_logits)

    def prior(self):
        """The marginal prior p(z) = sum_c p(c) p(z|c) as a TFP MixtureSameFamily."""
        return mixture_prior(self.prior_logits, self.components.distribution())

    def prior_sizes(self):
        return [self.level_sizes[-1]]

    def initialise_prior(self, moments):
        """PCA + k-means start: the k-means clusters matched to leaves (`match_to_tree`), each
        leaf's components at its cluster's centre with its cluster's spread."""
        centres, scales, labels = moments[self.level_sizes[-1]]
        leaf = match_to_tree(centres, np.bincount(labels, minlength=len(centres)), self.parents, self.seed)
        self.components.set_from_points(centres, leaf * self.components_per_leaf,
                                        scales=np.asarray(scales)[np.argsort(leaf)][self.component_ancestors[-1]])

    def components_of(self, leaves):
        """[M] bool: the components under any of `leaves`."""
        return np.isin(np.arange(self.n_components) // self.components_per_leaf, leaves)

    @property
    def marker_classes(self):
        """[(level, class)] of every marker set, as the clustering functions take them."""
        return [(m["level"], m["class"]) for m in self.markers]

    def allowed(self, labels):
        """[n, M] bool components each cell's labels allow (all for unlabelled cells), or None."""
        if labels is None or not self.semi_supervised:
            return None
        return allowed_components(labels, self.component_ancestors)

    def reseed(self, latent, latent_scale=None, labels=None, clusters=None, grouping_decay=1.0, top_level_decay=1.0,
               empty_leaves=(), marker_scores=None, top_level="compact"):
        """Set components (and learnable p(c)) from a tree-shaped clustering of latent means [n, D]
        (`clusters` k-means clusters per leaf; default `reseed_clusters`): each at its cells' mean,
        with variance the spread of their means plus their mean posterior variance (latent_scale
        [n, D], the M-step of EM; without it, the means' spread alone). `grouping_decay` and
        `top_level_decay` as in `tree_clustering` (the final refit passes the model's; the epoch
        re-seeds group levels alike; the same for `top_level`, how the graph placement splits the top
        level). The components of `empty_leaves` get no cells and a prior weight
        of EMPTY_WEIGHT, at the largest component's moments, so that no cell is ever theirs.
        marker_scores [n, S] (the cells' scores of the model's `markers`, `markers.scores`): the
        leaves are placed so that every marked class holds its markers' leaves (`place_leaves`)."""
        latent = np.asarray(latent, "float64")
        allowed = self.allowed(labels)
        leaf_allowed = None if allowed is None else allowed[:, ::self.components_per_leaf]
        component = tree_clustering(latent, self.parents, self.level_sizes[-1],
                                    self.components_per_leaf, self.seed, clusters or self.reseed_clusters,
                                    allowed=leaf_allowed,
                                    novel=self.novel_classes if allowed is not None else 0,
                                    placement=self.leaf_placement, grouping_decay=grouping_decay,
                                    top_level_decay=top_level_decay, empty_leaves=empty_leaves,
                                    top_level=top_level, markers=None if marker_scores is None else
                                    (marker_scores, self.marker_classes))
        posterior_variance = np.zeros_like(latent) if latent_scale is None else np.asarray(latent_scale, "float64") ** 2
        means, scales = np.zeros((self.n_components, self.latent_dim)), np.ones((self.n_components, self.latent_dim))
        for c in range(self.n_components):
            members, jitter = component == c, 0.0
            if not members.any():  # a leaf with fewer cells than components: near its leaf's mean
                members = component // self.components_per_leaf == c // self.components_per_leaf
                jitter = 0.01 * (c % self.components_per_leaf)
            if members.any():
                means[c] = latent[members].mean(axis=0) + jitter
                scales[c] = np.sqrt(latent[members].var(axis=0) + posterior_variance[members].mean(axis=0))
        sizes = np.bincount(component, minlength=self.n_components)
        empty = self.components_of(empty_leaves)
        means[empty], scales[empty] = means[sizes.argmax()], scales[sizes.argmax()]
        self.components.set_moments(means, np.clip(scales, 0.05, None))
        if self.prior_probabilities == "learnable":
            share = np.where(empty, EMPTY_WEIGHT, (sizes + 1.0) / (len(component) + self.n_components))
            self.prior_logits.assign(np.log(share).astype("float32"))
        return component

    def refit_prior(self, loc, scale, steps=10, reseed=True, labels=None, marker_scores=None):
        """Fit the prior to a fixed encoder: optionally re-seed from a tree-shaped clustering of the
        latent means (`final_refit_clusters` per leaf, coarse levels first by `grouping_decay`),
        then EM steps that each raise the ELBO's prior terms sum over cells of
        log sum_c p(c) exp(-KL(q(z|x) || p(z|c))) (Normal components: the M-step is closed-form,
        mu_c = sum q(c|x) m_x / sum q(c|x), sigma_c^2 = sum q(c|x) (s_x^2 + (m_x - mu_c)^2) / sum q(c|x),
        p(c) = mean q(c|x) when learnable; a labelled cell's q(c|x) restricted to the components its
        labels allow); `marker_scores` as in `reseed`, and then each cell's q(c|x) in the EM steps is
        also kept on its side of every marked class (`marker_sides`). Returns the component of every
        cell (argmax q(c|x), unrestricted)."""
        loc, scale = np.asarray(loc, "float64"), np.asarray(scale, "float64")
        allowed = self.allowed(labels)
        if reseed:
            component = self.reseed(loc, scale, labels, clusters=self.final_refit_clusters,
                                    grouping_decay=self.grouping_decay, top_level_decay=self.top_level_decay,
                                    empty_leaves=self.empty_leaves, marker_scores=marker_scores,
                                    top_level=self.top_level_split)
            if marker_scores is not None and self.markers:
                sides = marker_sides(component // self.components_per_leaf, self.parents, self.level_sizes[-1],
                                     self.marker_classes)
                sides = np.repeat(sides, self.components_per_leaf, axis=1)
                allowed = sides if allowed is None else allowed & sides
        for _ in range(steps):
            q = np.exp(self.component_log_posterior(tf.constant(loc, tf.float32), tf.constant(scale, tf.float32),
                                                    tf.constant(loc, tf.float32)).numpy().astype("float64"))
            if allowed is not None:
                q = q * allowed
                q /= np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
            weight = q.sum(axis=0) + 1e-8                                              # [M]
            means = (q.T @ loc) / weight[:, None]
            variances = (q.T @ (scale ** 2 + loc ** 2)) / weight[:, None] - means ** 2
            if self.empty_leaves:  # empty leaves keep no weight, at the largest component's place
                empty = self.components_of(self.empty_leaves)
                means[empty], variances[empty] = means[weight.argmax()], variances[weight.argmax()]
                weight[empty] = EMPTY_WEIGHT * weight[~empty].sum()
            self.components.set_moments(means, np.sqrt(np.maximum(variances, 1e-6)))
            if self.prior_probabilities == "learnable":
                self.prior_logits.assign(np.log(weight / weight.sum()).astype("float32"))
        return self.component_log_posterior(tf.constant(loc, tf.float32), tf.constant(scale, tf.float32),
                                            tf.constant(loc, tf.float32)).numpy().argmax(axis=1)

    # --------------------------------------------------------------------------- inference
    def encode(self, x, training=False, covariates=None):
        """log q(c|x) [B, M] and q(z|x)'s mean and scale [B, D]."""
        h = self.encoder_input(x, covariates)
        loc, scale = self.z_head(self.z_stack(h, training=training))
        return self.component_log_posterior(loc, scale, loc), loc, scale

    def component_log_posterior(self, loc, scale, z):
        """log q(c|x) = log softmax(log p(c) - KL(q(z|x) || p(z|c))): analytic for Normal
        components; for Student-t the one-sample KL at z, i.e. the posterior p(c|z)."""
        kl = self.kl_to_prior(loc[:, None], scale[:, None], z[:, None], self.components.distribution())
        return tf.nn.log_softmax(self.log_pc() - kl, axis=-1)

    def level_log_marginals(self, log_qc):
        """log q(y_l|x) for every level: the components under each class summed, [B, K_l] each."""
        return class_log_marginals(log_qc, self.level_masks)

    def terms(self, x, training=False, noise=None, covariates=None, labels=None):
        """Per-cell ELBO terms. With labels (semi-supervised): a labelled cell's q(c|x) is
        restricted to the components under its labels (the bound on log p(x, labels)), and
        -log q(labels|x) from the unrestricted posterior is added to the loss (Kingma et al.'s M2),
        so the encoder learns to place cells where their labels say."""
        covariates = self.check_covariates(covariates)
        h = self.encoder_input(x, covariates)
        loc, scale = self.z_head(self.z_stack(h, training=training))                    # [B, D]
        return self._terms_at(x, loc, scale, self.reparameterise(loc, scale, noise), covariates, labels, training)

    def _terms_at(self, x, loc, scale, z, covariates, labels=None, training=False):
        """`terms` given q(z|x)'s mean and scale and the latent draw z (covariates checked)."""
        # Decoded as [B, 1, D], the shape of the importance samples [B, S, D] (normalisation layers fix their rank).
        reconstruction = self.decoder.log_prob(x, self.decode(z[:, None], x, covariates, training))  # [B, 1]
        log_qc = self.component_log_posterior(loc, scale, z)
        classification = None
        if labels is not None and self.semi_supervised:
            log_qc, classification = restrict(log_qc, label_log_mask(labels, self.component_ancestors))
        log_pc = self.log_pc()
        pieces = mixture_terms(log_qc, loc[:, None], scale[:, None], z[:, None], reconstruction,
                               self.components.distribution(), log_pc)
        q_levels = self.level_log_marginals(log_qc)
        p_levels = [m[0] for m in self.level_log_marginals(log_pc[None])]
        # Chain split of KL(q(c) || p(c)): a class determines its ancestors, so the KL of level l's
        # marginals is the KL of the path prefix; the within-leaf part goes to the last level.
        prefix = [tf.reduce_sum(tf.exp(q) * (q - p), axis=-1) for q, p in zip(q_levels, p_levels)]
        level_kls = [prefix[0]] + [b - a for a, b in zip(prefix, prefix[1:])]
        level_kls[-1] += pieces["kl_y"] - prefix[-1]
        terms = self.combine(pieces["reconstruction"], pieces["kl_z"], pieces["kl_y"], pieces["kl_y"], level_kls,
                             q_levels, p_levels)
        return self.add_classification(terms, classification, loc[:, 0])

    def uniform_usage_targets(self):
        """The tree's 'uniform' usage target: every component equally used, so a class's target
        is its share of the leaves (Stem, one leaf of nine, 1/9; not 1/2)."""
        uniform = tf.fill((1, self.n_components), -float(np.log(self.n_components)))
        return [m[0] for m in self.level_log_marginals(uniform)]

    def level_predictions(self, level_probabilities, labels=None):
        """Nested by construction: every level's class is an ancestor of the most probable leaf
        (among those a labelled cell's labels allow, so its path goes through its labels)."""
        return path_predictions(level_probabilities, self.parents, labels)

    def prior_mixture(self):
        return self.log_pc(), self.components.distribution(), np.asarray(self.component_ancestors)

    def outputs(self, x, covariates=None):
        """The latent mean, q(y_l|x) per level, the most probable component, and the ELBO at the
        latent mean per count of the cell (`elbo_per_count`: how well the model explains the cell,
        read against its component's training cells by `scvae_hier.novelty`)."""
        covariates = self.check_covariates(covariates)
        log_qc, loc, scale = self.encode(x, covariates=covariates)
        elbo = self._terms_at(x, loc, scale, loc, covariates)["elbo"]                   # at z = the mean
        counts = tf.reduce_sum(x, axis=-1)
        return {"latent": loc, "component": tf.argmax(log_qc, axis=-1, output_type=tf.int32),
                "elbo_per_count": elbo / tf.maximum(counts, 1.0), "counts": counts,
                **{f"level_{l + 1}_probabilities": tf.exp(m) for l, m in enumerate(self.level_log_marginals(log_qc))}}

    def log_importance_weights(self, x, n_samples, seed=(0, 0), covariates=None):
        """[S, B] log p(x|z) + log p(z) - log q(z|x), z ~ q(z|x), with p(z) the full mixture over
        components (c summed out of the prior; q(z|x) has no discrete part)."""
        covariates = self.check_covariates(covariates)
        return mixture_log_weights(self, x, covariates, *self.posterior_mixture(x, covariates), self.prior(),
                                   n_samples, seed)

    def posterior_mixture(self, x, covariates=None):
        """q(z|x), one Gaussian: the discrete part lives in the prior only."""
        loc, scale = self.z_head(self.z_stack(self.encoder_input(x, self.check_covariates(covariates))))
        return tf.zeros_like(loc[:, :1]), loc[:, None], scale[:, None]

    # ---------------------------------------------------------------------------- training
    def fit(self, x=None, *args, callbacks=None, **kwargs):
        """Keras fit, plus the re-seeding callback when `reseed_epochs` is set, and the final refit
        of the prior (`refit_prior`, `final_refit` EM steps) once fitting ends and the best weights
        are back, when the training data is a CountBatches (or an array) to read the cells from."""
        callbacks = list(callbacks or [])
        reseeding = next((c for c in callbacks if isinstance(c, TreeReseeding)), None)
        cells, labels = getattr(x, "X", x), getattr(x, "labels", None)
        if reseeding is None and (self.reseed_epochs or self.final_refit) and hasattr(cells, "shape"):
            reseeding = TreeReseeding(cells, getattr(x, "covariates", None), self.reseed_epochs, log=print,
                                      labels=labels)
            callbacks.insert(0, reseeding)
        history = super().fit(x, *args, callbacks=callbacks, **kwargs)
        if self.final_refit and reseeding is not None:  # after the best weights are restored
            self.final_prior_refit(reseeding)
        return history

    def final_prior_refit(self, reseeding):
        """The final refit on the training cells of `reseeding` (a TreeReseeding): the prior
        re-seeded from the trained latent and `final_refit` EM steps. It reads the encoder and
        the cells only, so it gives the same prior whenever it is run on the same weights."""
        reseeding.set_model(self)
        scores = reseeding.marker_scores(self.markers) if self.markers else None
        loc, scale = reseeding.latent()
        component = self.refit_prior(loc, scale, steps=self.final_refit, labels=reseeding.labels, marker_scores=scores)
        held = ", each cell kept on its side of the marked classes" if self.markers else ""
        print(f"Refitted the prior to the trained encoder: tree-shaped k-means of the latent, "
              f"{self.final_refit} EM steps{held}.")
        self.metadata.pop("placement_margin", None)
        margin = self.placement_margin(loc, component, reseeding.labels)
        if margin is not None:  # read out with the clusters' names once they are named (`outputs.named_margin`)
            self.metadata["placement_margin"] = margin

    def placement_margin(self, loc, component, labels=None):
        """How clearly the refitted prior's leaves (the `component` [n] of training cells with latent
        means `loc` [n, D]) are grouped in the tree (`nearest_other_grouping`): {"margin", "regrouped":
        {level index (0 = top): leaves that change class}}. None where the graph placement did not
        decide (compact placement, marker genes) or the tree allows one grouping only."""
        if self.leaf_placement != "graph" or self.markers:
            return None
        leaf, parents, kept, conflicts = self.leaves_to_place(component, labels)
        found = nearest_other_grouping(np.asarray(loc, float), leaf, parents, len(kept), self.seed, conflicts,
                                       self.top_level_split)
        if found is None:
            return None
        margin, other = found
        return {"margin": round(margin, 6), "levels": len(parents) + 1,
                "regrouped": {str(level): [int(kept[k]) for k in leaves] for level, leaves
                              in regrouped_leaves(parents, len(kept), other).items()}}

    def leaves_to_place(self, component, labels=None):
        """The cells' leaves as the placement sees them (`component` [n] // components per leaf), in
        the tree without the empty leaves: (leaf [n] numbered in that tree, its parents, the original
        index of each of its leaves, the labels' conflicts for `place_leaves` or None)."""
        n_leaves, leaf = self.level_sizes[-1], np.asarray(component) // self.components_per_leaf
        allowed = self.allowed(labels)
        leaf_allowed = None if allowed is None else allowed[:, ::self.components_per_leaf]
        parents, kept = self.parents, np.arange(n_leaves)
        if self.empty_leaves:
            parents, kept = prune_leaves(self.parents, n_leaves, self.empty_leaves)
            leaf_allowed = None if leaf_allowed is None else leaf_allowed[:, kept]
            leaf = np.searchsorted(kept, leaf)   # no cell is in an empty leaf (EMPTY_WEIGHT)
        conflicts = None if leaf_allowed is None else label_conflicts(leaf, leaf_allowed, len(kept),
                                                                      self.novel_classes)
        return leaf, parents, kept, conflicts

    def get_config(self):
        return {**super().get_config(), "components_per_leaf": self.components_per_leaf,
                "prior_probabilities": self.prior_probabilities, "reseed_epochs": list(self.reseed_epochs),
                "reseed_clusters": self.reseed_clusters, "final_refit": self.final_refit,
                "final_refit_clusters": self.final_refit_clusters, "novel_classes": self.novel_classes,
                "leaf_placement": self.leaf_placement, "grouping_decay": self.grouping_decay,
                "top_level_decay": self.top_level_decay, "empty_leaves": self.empty_leaves, "markers": self.markers,
                "top_level_split": self.top_level_split}


class TreeReseeding(keras.callbacks.Callback):
    """At the start of each of `epochs` (counted from 0), set TreeVAE's components from a tree-shaped clustering of
    the training cells' latent means (`TreeVAE.reseed`). A run resumed after that epoch keeps
    the re-seeded weights from its checkpoint; one resumed at that epoch re-seeds as the
    uninterrupted run did (same weights, same seed, same k-means)."""

    def __init__(self, cells, covariates=None, epochs=(5,), batch_size=1024, log=None, labels=None):
        super().__init__()
        self.cells, self.covariates, self.labels = cells, covariates, labels
        self.epochs = tuple(int(e) for e in (epochs if np.ndim(epochs) else [epochs]))
        self.batch_size, self.log = int(batch_size), log
        self.assignments = None

    def latent(self):
        """Means and scales of q(z|x) of every training cell."""
        means, scales = [], []
        for start in range(0, self.cells.shape[0], self.batch_size):
            x = self.cells[start:start + self.batch_size]
            x = tf.constant(x.toarray() if hasattr(x, "toarray") else np.asarray(x), tf.float32)
            c = None if self.covariates is None else tf.constant(self.covariates[start:start + self.batch_size],
                                                                 tf.float32)
            _, loc, scale = self.model.encode(x, covariates=self.model.check_covariates(c))
            means.append(loc.numpy())
            scales.append(scale.numpy())
        return np.concatenate(means), np.concatenate(scales)

    def marker_scores(self, markers):
        """[n, S] every training cell's score of each marker set (`markers.scores`)."""
        return np.concatenate([cell_marker_scores(self.cells[start:start + self.batch_size], markers)
                               for start in range(0, self.cells.shape[0], self.batch_size)])

    def on_epoch_begin(self, epoch, logs=None):
        if epoch not in self.epochs:
            return
        self.assignments = self.model.reseed(*self.latent(), labels=self.labels)
        if self.log:
            used = np.bincount(self.assignments, minlength=self.model.n_components)
            self.log(f"Re-seeded the tree's components from the latent at epoch {epoch + 1}: cells per component {used.tolist()}.")
