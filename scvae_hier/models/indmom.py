"""IndMoMVAE: independent mixture branches, one per hierarchy level (the poster's ablation).

Branch l is a mixture with K_l components: its own q(y_l|x), q(z|x,y_l), p(z|y_l) and p(y_l),
on a shared input trunk and a shared decoder. With a uniform choice of branch the mean of the
branch ELBOs bounds log p(x) (log mean_b p_b(x) >= mean_b log p_b(x) >= mean_b ELBO_b).
All sum_l K_l decoder passes run as one batched call. Level-l clusters come from branch l.
With partial labels each branch's q(y_l|x) of a labelled cell is restricted to the classes its
labels allow, and -log q_l(allowed|x) summed over the branches is the classification term.
"""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import numpy as np
import tensorflow as tf

from ..choices import PRIOR_LAWS, PRIOR_PROBABILITIES, check_choice
from ..distributions import component_law, mixture_prior
from .hierarchical import HierarchicalVAE
from .layers import DenseStack, GaussianHead, PriorComponents
from .mixture import mixture_log_weights, mixture_terms
from .supervision import restrict


@keras.saving.register_keras_serializable("scvae_hier")
class IndMoMVAE(HierarchicalVAE):
    @classmethod
    def arguments_from(cls, options, hierarchy) -> dict:
        return dict(super().arguments_from(options, hierarchy), prior_probabilities=options.prior_probabilities)

    def __init__(self, n_genes, level_sizes=(2, 4, 5, 9), prior="normal", prior_probabilities="uniform", parents=None,
                 semi_supervised=False, label_weight=5.0, **kwargs):
        super().__init__(n_genes, level_sizes=level_sizes, prior=prior, **kwargs)
        check_choice("prior", prior, PRIOR_LAWS)
        check_choice("prior probabilities", prior_probabilities, PRIOR_PROBABILITIES)
        self.prior_probabilities = prior_probabilities
        self.trunk = DenseStack(self.hidden[:1], self.normalisation, name="trunk")
        branch_units = self.hidden[1:] or self.hidden[:1]
        self.y_stacks, self.y_logits, self.z_stacks, self.z_heads, self.priors, self.prior_logits = [], [], [], [], [], []
        for level, k in enumerate(self.level_sizes, start=1):
            self.y_stacks.append(DenseStack(branch_units, self.normalisation, name=f"y_{level}_encoder"))
            self.y_logits.append(keras.layers.Dense(k, name=f"y_{level}_logits"))
            self.z_stacks.append(DenseStack(branch_units, self.normalisation, n_categories=k, name=f"z_{level}_encoder"))
            self.z_heads.append(GaussianHead(self.latent_dim, name=f"z_{level}_head"))
            self.priors.append(PriorComponents((k,), self.latent_dim, prior, name=f"prior_{level}"))
            self.prior_logits.append(self.add_weight(shape=(k,), initializer="zeros",
                                                     trainable=prior_probabilities == "learnable",
                                                     name=f"prior_{level}_logits"))
        self._init_level_supervision(parents, semi_supervised, label_weight)
        self._init_trackers()

    def prior_sizes(self):
        return list(self.level_sizes)

    def initialise_prior(self, moments):
        for prior, k in zip(self.priors, self.level_sizes):
            centres, scales, _ = moments[k]
            prior.set_moments(centres, scales)

    def prior_mixture(self):
        """p(z) = (1/L) sum over branches of branch l's mixture: one mixture of sum_l K_l components;
        a component of branch l has a class at level l only."""
        log_weights = tf.concat([tf.nn.log_softmax(logits) for logits in self.prior_logits], 0) - np.log(self.n_levels)
        loc = tf.concat([p.loc for p in self.priors], 0)
        scale = tf.concat([p.scale for p in self.priors], 0)
        df = None if self.prior_law == "normal" else tf.concat([p.df for p in self.priors], 0)
        levels = np.full((self.n_levels, sum(self.level_sizes)), -1)
        start = 0
        for level, k in enumerate(self.level_sizes):
            levels[level, start:start + k] = np.arange(k)
            start += k
        return log_weights, component_law(self.prior_law, loc, scale, df), levels

    def encode(self, x, training=False, covariates=None):
        """Per branch: log q(y_l|x) [B, K_l], and loc, scale of q(z|x,y_l) [B, K_l, D]."""
        trunk = self.trunk(self.encoder_input(x, covariates), training=training)
        branches = []
        for y_stack, y_logits, z_stack, z_head in zip(self.y_stacks, self.y_logits, self.z_stacks, self.z_heads):
            log_qy = tf.nn.log_softmax(y_logits(y_stack(trunk, training=training)))
            loc, scale = z_head(z_stack(trunk, training=training))
            branches.append((log_qy, loc, scale))
        return branches

    def terms(self, x, training=False, noise=None, covariates=None, labels=None):
        covariates = self.check_covariates(covariates)
        branches = self.encode(x, training, covariates)
        classification = None
        if labels is not None and self.semi_supervised:
            restricted = [restrict(log_qy, mask) for (log_qy, _, _), mask in zip(branches, self.label_level_masks(labels))]
            classification = tf.add_n([minus_log_in for _, minus_log_in in restricted])
            branches = [(log_qy, loc, scale) for (log_qy, _), (_, loc, scale) in zip(restricted, branches)]
        locs = tf.concat([loc for _, loc, _ in branches], axis=1)     # [B, sum K_l, D]
        scales = tf.concat([scale for _, _, scale in branches], axis=1)
        z = self.reparameterise(locs, scales, noise)
        reconstruction = self.decoder.log_prob(x, self.decode(z, x, covariates, training))  # [B, sum K_l]
        edges = np.cumsum((0,) + self.level_sizes)
        per_branch = []
        for level, (log_qy, loc, scale) in enumerate(branches):
            part = slice(int(edges[level]), int(edges[level + 1]))
            per_branch.append(mixture_terms(log_qy, loc, scale, z[:, part], reconstruction[:, part],
                                            self.priors[level].distribution(),
                                            tf.nn.log_softmax(self.prior_logits[level])))
        mean = lambda key: tf.add_n([b[key] for b in per_branch]) / self.n_levels  # noqa: E731
        kl_y = mean("kl_y")
        log_p_marginals = [tf.nn.log_softmax(logits) for logits in self.prior_logits]
        terms = self.combine(mean("reconstruction"), mean("kl_z"), kl_y, kl_y, [b["kl_y"] for b in per_branch],
                             [log_qy for log_qy, _, _ in branches], log_p_marginals)
        return self.add_classification(terms, classification, kl_y)

    def log_importance_weights(self, x, n_samples, seed=(0, 0), covariates=None):
        """[S, B] log-weights whose log-mean-exp over S is log mean_b (IWAE bound of branch b).

        Sample s is the branch average of the branches' weights, log (1/L) sum_b w_bs: an unbiased
        estimate of p(x) = (1/L) sum_b p_b(x), each w_bs drawn as in MixtureVAE from branch b."""
        covariates = self.check_covariates(covariates)
        seeds = tf.unstack(tf.random.experimental.stateless_split(seed, self.n_levels))
        weights = []
        for level, (log_qy, loc, scale) in enumerate(self.encode(x, covariates=covariates)):
            prior = mixture_prior(self.prior_logits[level], self.priors[level].distribution())
            weights.append(mixture_log_weights(self, x, covariates, log_qy, loc, scale, prior, n_samples, seeds[level]))
        return tf.reduce_logsumexp(tf.stack(weights), axis=0) - tf.math.log(float(self.n_levels))

    def posterior_mixture(self, x, covariates=None):
        """The finest branch's q(z|x): the branch whose latent `outputs` reports."""
        return self.encode(x, covariates=self.check_covariates(covariates))[-1]

    def outputs(self, x, covariates=None):
        out = {}
        for level, (log_qy, loc, _) in enumerate(self.encode(x, covariates=self.check_covariates(covariates)),
                                                 start=1):
            qy = tf.exp(log_qy)
            out[f"level_{level}_latent"] = tf.reduce_sum(qy[..., None] * loc, axis=1)
            out[f"level_{level}_probabilities"] = qy
        out["latent"] = out[f"level_{self.n_levels}_latent"]
        return out

    def get_config(self):
        return {**super().get_config(), "prior_probabilities": self.prior_probabilities}
