"""MoMixVAE: the mixture-of-mixtures VAE.

p(x, z, y_1..y_L) = p(x|z) p(z|y_1..y_L) prod_l p(y_l|y_<l), with the prior over z a TFP
MixtureSameFamily nested L times. Level-l clusters: argmax of the marginal q(y_l|x).

Both inference modes use the categorical posterior q(y_1|x) q(y_l|x,y_<l) and enumerate every
path exactly in the prior and categorical terms; they differ in q(z|x, path):
- exact: q(z|x, y_1..y_L), one decoder pass per path (prod_l K_l = 360 for the 2/4/5/9
  hierarchy), batched into one call. The definition; tested by brute force.
- scalable: q(z|x, y_L), shared by every path that ends in the same finest class, so the
  decoder runs K_L times (9), like the flat mixture, however many paths there are. The KL of
  each path's q(z|x, y_L) to its own component p(z|y_1..y_L) is still taken over all paths
  (P Gaussian KLs of dimension D per cell: cheap). It is an exact ELBO of the same generative
  model with a smaller posterior family, so it is a true lower bound, never an estimate.
With partial labels a labelled cell's q(path|x) is restricted to the paths its labels allow (at
each level the labelled class, and below a coarse label only its subtree), and -log q(allowed
paths|x) is the classification term.
"""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import numpy as np
import tensorflow as tf

from ..choices import INFERENCE_MODES, PRIOR_LAWS, TRANSITIONS, check_choice
from .hierarchical import HierarchicalVAE
from .layers import DenseStack, GaussianHead, NestedPrior
from .mixture import mixture_log_weights
from .paths import chain, level_kls, level_marginals, n_paths
from .supervision import restrict


@keras.saving.register_keras_serializable("scvae_hier")
class MoMixVAE(HierarchicalVAE):
    @classmethod
    def arguments_from(cls, options, hierarchy) -> dict:
        return dict(super().arguments_from(options, hierarchy), inference=options.inference,
                    transitions=options.transitions, component_means=options.component_means)

    def __init__(self, n_genes, level_sizes=(2, 4, 5, 9), prior="normal", inference="scalable",
                 transitions="learnable", component_means="tree", parents=None, semi_supervised=False,
                 label_weight=5.0, **kwargs):
        super().__init__(n_genes, level_sizes=level_sizes, prior=prior, **kwargs)
        check_choice("prior", prior, PRIOR_LAWS)
        check_choice("inference mode", inference, INFERENCE_MODES)
        check_choice("transitions", transitions, TRANSITIONS)
        self.inference = inference
        self.transitions = transitions
        self.component_means = component_means
        self.n_paths = n_paths(self.level_sizes)
        self.prior_layer = NestedPrior(self.level_sizes, self.latent_dim, prior, transitions, component_means,
                                       name="prior")
        self.y_stack = DenseStack(self.hidden, self.normalisation, name="y_encoder")
        self.y_first = keras.layers.Dense(self.level_sizes[0], name="y_1_logits")
        # q(y_l | x, y_<l): one learned vector per prefix of earlier levels, then the logits.
        self.y_given_prefix = [
            DenseStack(self.hidden[-1:], self.normalisation, n_categories=n_paths(self.level_sizes[:level]),
                       name=f"y_{level + 1}_encoder")
            for level in range(1, self.n_levels)]
        self.y_next = [keras.layers.Dense(self.level_sizes[level], name=f"y_{level + 1}_logits")
                       for level in range(1, self.n_levels)]
        # q(z|x, path) in exact mode; q(z|x, y_L) in scalable mode.
        z_categories = self.n_paths if inference == "exact" else self.level_sizes[-1]
        self.z_stack = DenseStack(self.hidden, self.normalisation, n_categories=z_categories, name="z_encoder")
        self.z_head = GaussianHead(self.latent_dim, name="z_head")
        self._init_level_supervision(parents, semi_supervised, label_weight)
        self._init_trackers()

    def prior_sizes(self):
        return list(self.level_sizes)

    def initialise_prior(self, moments):
        """Path components start at the k-means centre of their finest class (tree components: at
        each level's centres, as offsets from the most frequent parent), with a little noise to
        break ties; learnable transitions start at the co-occurrence of consecutive levels'
        k-means assignments, a data-driven soft hierarchy."""
        centres, scales, _ = moments[self.level_sizes[-1]]
        labels = [moments[k][2] for k in self.level_sizes]
        cooccurrence = []
        for level in range(1, self.n_levels):
            counts = np.ones(self.level_sizes[level - 1: level + 1])
            np.add.at(counts, (labels[level - 1], labels[level]), 1.0)
            cooccurrence.append(counts)
        components = self.prior_layer.components
        if self.component_means == "tree":
            parents = [None] + [counts.argmax(axis=0) for counts in cooccurrence]
            components.set_level_moments([moments[k][0] for k in self.level_sizes], scales, parents)
        else:
            shape = self.level_sizes + (self.latent_dim,)
            noise = np.random.default_rng(self.seed).normal(0.0, 0.05, shape)
            components.set_moments(np.broadcast_to(centres, shape) + noise, np.broadcast_to(scales, shape))
        if self.transitions != "learnable":
            return
        first = np.bincount(labels[0], minlength=self.level_sizes[0]) + 1.0
        self.prior_layer.level_logits[0].assign(np.log(first / first.sum()).astype("float32"))
        for level, counts in enumerate(cooccurrence, start=1):
            log_conditional = np.log(counts / counts.sum(axis=1, keepdims=True))
            target = self.prior_layer.level_logits[level]
            target.assign(np.broadcast_to(log_conditional, target.shape).astype("float32"))

    def prior(self):
        """The marginal prior p(z): TFP MixtureSameFamily nested once per level."""
        return self.prior_layer.distribution()

    def prior_mixture(self):
        paths = np.array(np.unravel_index(np.arange(self.n_paths), self.level_sizes))   # [L, P]
        return tf.reshape(self.log_prior_paths(), [-1]), self.prior_layer.flat_components(), paths

    def log_prior_paths(self):
        """log p(y_1..y_L), shape [K_1, ..., K_L]."""
        return chain(self.prior_layer.level_log_probs())

    def log_q_paths(self, h, training=False):
        """log q(y_1..y_L | x), shape [B, K_1, ..., K_L]."""
        trunk = self.y_stack(h, training=training)
        log_q = tf.nn.log_softmax(self.y_first(trunk))
        for level, (stack, head) in enumerate(zip(self.y_given_prefix, self.y_next), start=1):
            conditional = tf.nn.log_softmax(head(stack(trunk, training=training)))  # [B, prefixes, K_l]
            shape = tf.concat([[tf.shape(h)[0]], self.level_sizes[: level + 1]], axis=0)
            log_q = tf.expand_dims(log_q, -1) + tf.reshape(conditional, shape)
        return log_q

    def to_paths(self, t):
        """Scalable mode: broadcast a per-finest-class tensor [B, K_L, ...] to every path [B, P, ...]."""
        if self.inference == "exact":
            return t
        batch = tf.shape(t)[0]
        leading = tf.concat([[batch], self.level_sizes], axis=0)
        expanded = tf.reshape(t, tf.concat([[batch], [1] * (self.n_levels - 1), tf.shape(t)[1:]], axis=0))
        full = tf.broadcast_to(expanded, tf.concat([leading, tf.shape(t)[2:]], axis=0))
        return tf.reshape(full, tf.concat([[batch, self.n_paths], tf.shape(t)[2:]], axis=0))

    def path_label_mask(self, labels):
        """[B, K_1, ..., K_L] log-mask of the paths a cell's labels allow: the sum of the levels' masks."""
        mask = 0.0
        for level, level_mask in enumerate(self.label_level_masks(labels)):
            shape = [-1] + [1] * level + [self.level_sizes[level]] + [1] * (self.n_levels - level - 1)
            mask = mask + tf.reshape(level_mask, shape)
        return mask

    def terms(self, x, training=False, noise=None, covariates=None, labels=None):
        covariates = self.check_covariates(covariates)
        h = self.encoder_input(x, covariates)
        batch = tf.shape(x)[0]
        log_p = self.log_prior_paths()
        log_q = self.log_q_paths(h, training)                                   # [B, K_1..K_L]
        classification = None
        if labels is not None and self.semi_supervised:
            flat, classification = restrict(tf.reshape(log_q, [batch, -1]),
                                            tf.reshape(self.path_label_mask(labels), [batch, -1]))
            log_q = tf.reshape(flat, tf.shape(log_q))
        q_flat = tf.exp(tf.reshape(log_q, [batch, -1]))                         # [B, P]
        loc, scale = self.z_head(self.z_stack(h, training=training))            # [B, P or K_L, D]
        z = self.reparameterise(loc, scale, noise)
        reconstruction = self.decoder.log_prob(x, self.decode(z, x, covariates, training))  # [B, P or K_L]
        kl_z = self.kl_to_prior(self.to_paths(loc), self.to_paths(scale), self.to_paths(z),
                                self.prior_layer.flat_components())             # [B, P]
        reconstruction = tf.reduce_sum(q_flat * self.to_paths(reconstruction), axis=-1)
        kl_z = tf.reduce_sum(q_flat * kl_z, axis=-1)
        kls = level_kls(log_q, log_p, self.n_levels)
        kl_y = tf.add_n(kls)
        terms = self.combine(reconstruction, kl_z, kl_y, kl_y / self.n_levels, kls,
                             level_marginals(log_q, self.n_levels),
                             level_marginals(tf.expand_dims(log_p, 0), self.n_levels))
        return self.add_classification(terms, classification, kl_y)

    def log_importance_weights(self, x, n_samples, seed=(0, 0), covariates=None):
        """[S, B] log p(x, z) - log q(z|x) with every path summed out of p(z) and of
        q(z|x) = sum_path q(path|x) q(z|x, path). In scalable mode q(z|x, path) depends on the
        path through y_L alone, so the sum runs over y_L with the marginal q(y_L|x) (same law)."""
        covariates = self.check_covariates(covariates)
        return mixture_log_weights(self, x, covariates, *self.posterior_mixture(x, covariates), self.prior(),
                                   n_samples, seed)

    def posterior_mixture(self, x, covariates=None):
        """q(z|x) over the paths (exact inference) or over y_L (scalable: q(z|x, path) depends on
        the path through y_L alone, so the marginal q(y_L|x) weighs the same law)."""
        h = self.encoder_input(x, self.check_covariates(covariates))
        log_q = self.log_q_paths(h)
        loc, scale = self.z_head(self.z_stack(h))                                 # [B, P or K_L, D]
        if self.inference == "exact":
            return tf.reshape(log_q, [tf.shape(x)[0], -1]), loc, scale
        return level_marginals(log_q, self.n_levels)[-1], loc, scale

    def outputs(self, x, covariates=None):
        h = self.encoder_input(x, self.check_covariates(covariates))
        log_q = self.log_q_paths(h)
        loc, _ = self.z_head(self.z_stack(h))
        q_flat = tf.exp(tf.reshape(log_q, [tf.shape(x)[0], -1]))
        latent = tf.reduce_sum(q_flat[..., None] * self.to_paths(loc), axis=1)
        marginals = level_marginals(log_q, self.n_levels)
        return {"latent": latent, **{f"level_{l + 1}_probabilities": tf.exp(m) for l, m in enumerate(marginals)}}

    def get_config(self):
        return {**super().get_config(), "inference": self.inference, "transitions": self.transitions,
                "component_means": self.component_means}
