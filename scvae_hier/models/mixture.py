"""MixtureVAE: scVAE's Gaussian-mixture VAE (GMVAE), the flat baseline.

p(y) = Cat(pi), p(z|y=k) = Law(mu_k, sigma_k), p(x|z) a count law;
q(y|x) a categorical MLP, q(z|x,y) a Gaussian MLP on [x, onehot(y)].
ELBO(x) = sum_k q(k|x) (E_q(z|x,k) log p(x|z) - KL(q(z|x,k) || p(z|k))) - KL(q(y|x) || p(y)),
with the sum over k exact and the K decoder passes run as one batched call.

With partial labels (`semi_supervised`) the first K_L components are the hierarchy's finest
classes, in its order (any more are unnamed, for types nobody labelled: "unassigned" at every
level), a labelled cell's q(y|x) is restricted to the components its labels allow, and the model
is read like TreeVAE: q(y_l|x) is the sum of its leaves' posteriors and the predictions are the
most probable leaf and its ancestors, a path of the hierarchy (`clustering` "levels").
"""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import tensorflow as tf
import tensorflow_probability as tfp

from ..choices import PRIOR_LAWS, PRIOR_PROBABILITIES, check_choice
from ..distributions import mixture_prior
from ..tree_shape import leaf_ancestors
from .base import BaseVAE
from .layers import DenseStack, GaussianHead, PriorComponents
from .paths import perplexity
from .supervision import (class_log_marginals, component_level_masks, label_log_mask, path_predictions, restrict,
                          supervision_arguments)


@keras.saving.register_keras_serializable("scvae_hier")
class MixtureVAE(BaseVAE):
    term_names = ("loss", "elbo", "reconstruction", "kl_z", "kl_y", "components_used")
    clustering = "flat"

    @classmethod
    def arguments_from(cls, options, hierarchy) -> dict:
        n_components = options.n_components or (hierarchy.sizes[-1] if hierarchy else None)
        if not n_components:
            raise ValueError("The mixture needs a number of components: pass --n-components, or a hierarchy "
                             "(--hierarchy / --levels / --label-column) to use its number of finest classes.")
        arguments = dict(n_components=n_components, prior=options.prior, prior_probabilities=options.prior_probabilities)
        supervised = supervision_arguments(options, hierarchy)
        if supervised:
            arguments.update(supervised, class_sizes=list(hierarchy.sizes))
        return arguments

    def __init__(self, n_genes, n_components=10, prior="normal", prior_probabilities="uniform", semi_supervised=False,
                 label_weight=5.0, class_sizes=None, parents=None, **kwargs):
        super().__init__(n_genes, **kwargs)
        check_choice("prior", prior, PRIOR_LAWS)
        check_choice("prior probabilities", prior_probabilities, PRIOR_PROBABILITIES)
        if int(n_components) < 2:
            raise ValueError(f"A mixture needs at least 2 components, got {n_components}.")
        self.n_components = int(n_components)
        self.prior_law = prior
        self.prior_probabilities = prior_probabilities
        self.y_stack = DenseStack(self.hidden, self.normalisation, name="y_encoder")
        self.y_logits = keras.layers.Dense(self.n_components, name="y_logits")
        self.z_stack = DenseStack(self.hidden, self.normalisation, n_categories=self.n_components, name="z_encoder")
        self.z_head = GaussianHead(self.latent_dim, name="z_head")
        self.prior_components = PriorComponents((self.n_components,), self.latent_dim, prior, name="prior")
        self.prior_logits = self.add_weight(shape=(self.n_components,), initializer="zeros",
                                            trainable=prior_probabilities == "learnable", name="prior_logits")
        self.class_sizes = None if class_sizes is None else [int(k) for k in class_sizes]
        self.parents = None if parents is None else [[int(p) for p in links] for links in parents]
        if semi_supervised:
            self._name_components()
        self._init_supervision(semi_supervised, label_weight)
        self._init_trackers()

    def _name_components(self):
        """Components as the hierarchy's leaves (class_sizes, parents), and the extra ones under an
        "unassigned" class at every level: `tree_parents`, `level_sizes`, `component_ancestors`
        [L, K] and the log-masks [K, K_l] that sum leaves into classes."""
        if not self.class_sizes or len(self.parents or []) != len(self.class_sizes) - 1:
            raise ValueError("A semi-supervised MixtureVAE needs the hierarchy's class_sizes and parents.")
        sizes, extra = self.class_sizes, self.n_components - self.class_sizes[-1]
        if extra < 0:
            raise ValueError(f"With labels the mixture's components are the {sizes[-1]} finest classes; "
                             f"--n-components must be at least {sizes[-1]}, got {self.n_components}.")
        self.tree_parents = [links + ([sizes[level]] * (extra if level == len(self.parents) - 1 else 1) if extra else [])
                             for level, links in enumerate(self.parents)]
        self.level_sizes = tuple(k + (1 if extra else 0) for k in sizes[:-1]) + (self.n_components,)
        # No label names an "unassigned" class or an extra leaf, so a labelled cell never uses them.
        self.component_ancestors = leaf_ancestors(self.tree_parents, self.n_components)
        self.level_masks = component_level_masks(self.component_ancestors, self.level_sizes)
        self.clustering = "levels"

    def prior_sizes(self):
        return [self.n_components]

    def initialise_prior(self, moments):
        centres, scales, _ = moments[self.n_components]
        self.prior_components.set_moments(centres, scales)

    def log_py(self):
        return tf.nn.log_softmax(self.prior_logits)

    def prior(self):
        """The marginal prior p(z) = sum_k pi_k p(z|k) as a TFP MixtureSameFamily."""
        return mixture_prior(self.prior_logits, self.prior_components.distribution())

    def prior_mixture(self):
        return self.log_py(), self.prior_components.distribution(), None

    def encode(self, x, training=False, covariates=None):
        """log q(y|x) [B, K] and the parameters of q(z|x,y) for every y: [B, K, D] each."""
        h = self.encoder_input(x, covariates)
        log_qy = tf.nn.log_softmax(self.y_logits(self.y_stack(h, training=training)))
        loc, scale = self.z_head(self.z_stack(h, training=training))
        return log_qy, loc, scale

    def terms(self, x, training=False, noise=None, covariates=None, labels=None):
        covariates = self.check_covariates(covariates)
        log_qy, loc, scale = self.encode(x, training, covariates)
        classification = None
        if labels is not None and self.semi_supervised:
            log_qy, classification = restrict(log_qy, label_log_mask(labels, self.component_ancestors))
        z = self.reparameterise(loc, scale, noise)                                     # [B, K, D]
        reconstruction = self.decoder.log_prob(x, self.decode(z, x, covariates, training))  # [B, K]
        terms = mixture_terms(log_qy, loc, scale, z, reconstruction, self.prior_components.distribution(),
                              self.log_py())
        terms["loss"] = -(terms["reconstruction"] - self.kl_weight * (terms["kl_z"] + terms["kl_y"]))
        terms["components_used"] = perplexity(log_qy)
        return self.add_classification(terms, classification, terms["kl_y"])

    def outputs(self, x, covariates=None):
        log_qy, loc, _ = self.encode(x, covariates=self.check_covariates(covariates))
        qy = tf.exp(log_qy)
        latent = tf.reduce_sum(qy[..., None] * loc, axis=1)
        if not self.semi_supervised:
            return {"latent": latent, "cluster_probabilities": qy}
        return {"latent": latent, **{f"level_{l + 1}_probabilities": tf.exp(m)
                                     for l, m in enumerate(class_log_marginals(log_qy, self.level_masks))}}

    def level_predictions(self, level_probabilities, labels=None):
        """With labels: the most probable leaf (among those the labels allow) and its ancestors."""
        if not self.semi_supervised:
            return super().level_predictions(level_probabilities)
        return path_predictions(level_probabilities, self.tree_parents, labels)

    def log_importance_weights(self, x, n_samples, seed=(0, 0), covariates=None):
        """log p(x, z) - log q(z|x), [S, B], for z ~ q(z|x) = sum_y q(y|x) q(z|x,y) (stateless draws)."""
        covariates = self.check_covariates(covariates)
        return mixture_log_weights(self, x, covariates, *self.posterior_mixture(x, covariates), self.prior(),
                                   n_samples, seed)

    def posterior_mixture(self, x, covariates=None):
        return self.encode(x, covariates=self.check_covariates(covariates))

    def get_config(self):
        return {**super().get_config(), "n_components": self.n_components, "prior": self.prior_law,
                "prior_probabilities": self.prior_probabilities, "semi_supervised": self.semi_supervised,
                "label_weight": self.label_weight, "class_sizes": self.class_sizes, "parents": self.parents}


def mixture_terms(log_qy, loc, scale, z, reconstruction, components, log_py) -> dict:
    """The exact-sum ELBO of one mixture: q(y|x) weights per-cluster reconstruction and KL terms.

    Shapes: log_qy [B, K]; loc, scale, z [B, K, D]; reconstruction [B, K]; components with batch
    shape [K]; log_py [K]. Shared by MixtureVAE and each branch of IndMoMVAE."""
    qy = tf.exp(log_qy)
    kl_z = tf.reduce_sum(qy * BaseVAE.kl_to_prior(loc, scale, z, components), axis=-1)
    kl_y = tf.reduce_sum(qy * (log_qy - log_py), axis=-1)
    expected_reconstruction = tf.reduce_sum(qy * reconstruction, axis=-1)
    return {"elbo": expected_reconstruction - kl_z - kl_y, "reconstruction": expected_reconstruction,
            "kl_z": kl_z, "kl_y": kl_y}


def draw_latent(log_qy, loc, scale, n_samples, seed):
    """S stateless draws z ~ q(z|x) = sum_y q(y|x) N(loc_y, scale_y), [B, S, D]: y first, then z.

    Shapes: log_qy [B, K]; loc, scale [B, K, D]; seed a stateless seed pair."""
    y_seed, z_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    y = tf.random.stateless_categorical(log_qy, n_samples, y_seed)                    # [B, S]
    loc_y, scale_y = tf.gather(loc, y, batch_dims=1), tf.gather(scale, y, batch_dims=1)  # [B, S, D]
    return loc_y + scale_y * tf.random.stateless_normal(tf.shape(loc_y), z_seed)


def mixture_log_weights(model, x, covariates, log_qy, loc, scale, prior, n_samples, seed):
    """Importance log-weights [S, B] of a mixture with y summed out of both p(z) (`prior`, the
    marginal mixture) and q(z|x) = sum_y q(y|x) q(z|x,y): the proposal draws y, then z, but the
    weight never conditions on the drawn y, so its log-mean-exp bounds log p(x).

    Shapes: log_qy [B, K]; loc, scale [B, K, D]; seed a stateless seed pair; `model` decodes."""
    z = draw_latent(log_qy, loc, scale, n_samples, seed)                              # [B, S, D]
    log_px = model.decoder.log_prob(x, model.decode(z, x, covariates))                # [B, S]
    q_components = tfp.distributions.Independent(
        tfp.distributions.Normal(loc[:, None], scale[:, None]), reinterpreted_batch_ndims=1)  # [B, 1, K]
    log_qz = tf.reduce_logsumexp(log_qy[:, None] + q_components.log_prob(z[:, :, None]), axis=-1)
    return tf.transpose(log_px + prior.log_prob(z) - log_qz)
