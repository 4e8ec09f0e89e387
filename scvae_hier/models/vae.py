"""The plain VAE: q(z|x) Gaussian, p(z) = N(0, I). The simplest baseline."""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import tensorflow as tf
import tensorflow_probability as tfp

from .base import BaseVAE
from .layers import DenseStack, GaussianHead

tfd = tfp.distributions


@keras.saving.register_keras_serializable("scvae_hier")
class VAE(BaseVAE):
    term_names = ("loss", "elbo", "reconstruction", "kl_z")

    def __init__(self, n_genes, **kwargs):
        super().__init__(n_genes, **kwargs)
        self.z_stack = DenseStack(self.hidden, self.normalisation, name="z_encoder")
        self.z_head = GaussianHead(self.latent_dim, name="z_head")
        self._init_trackers()

    def prior(self):
        zeros = tf.zeros((self.latent_dim,))
        return tfd.Independent(tfd.Normal(zeros, zeros + 1.0), reinterpreted_batch_ndims=1)

    def encode(self, x, training=False, covariates=None):
        return self.z_head(self.z_stack(self.encoder_input(x, covariates), training=training))

    def terms(self, x, training=False, noise=None, covariates=None):
        covariates = self.check_covariates(covariates)
        loc, scale = self.encode(x, training, covariates)
        z = self.reparameterise(loc, scale, noise)
        reconstruction = self.decoder.log_prob(x, self.decode(z, x, covariates, training))
        kl_z = self.kl_to_prior(loc, scale, z, self.prior())
        elbo = reconstruction - kl_z
        loss = -(reconstruction - self.kl_weight * kl_z)
        return {"loss": loss, "elbo": elbo, "reconstruction": reconstruction, "kl_z": kl_z}

    def log_importance_weights(self, x, n_samples, seed=(0, 0), covariates=None):
        """log p(x|z) + log N(z; 0, I) - log q(z|x), [S, B], z ~ q(z|x) (stateless draws)."""
        covariates = self.check_covariates(covariates)
        loc, scale = self.encode(x, covariates=covariates)
        q = tfd.Independent(tfd.Normal(loc[:, None], scale[:, None]), reinterpreted_batch_ndims=1)
        z = loc[:, None] + scale[:, None] * tf.random.stateless_normal(
            tf.stack([tf.shape(loc)[0], n_samples, tf.shape(loc)[1]]), seed)            # [B, S, D]
        # The decoder was built on [B, D] (batch norm fixes the rank): decode the samples flattened.
        repeat = lambda t: None if t is None else tf.repeat(t, n_samples, axis=0)  # noqa: E731  rows of z
        params = self.decode(tf.reshape(z, [-1, self.latent_dim]), repeat(x), repeat(covariates))
        params = {name: tf.reshape(p, [tf.shape(x)[0], n_samples, -1]) for name, p in params.items()}
        log_w = self.decoder.log_prob(x, params) + self.prior().log_prob(z) - q.log_prob(z)
        return tf.transpose(log_w)

    def posterior_mixture(self, x, covariates=None):
        loc, scale = self.encode(x, covariates=self.check_covariates(covariates))
        return tf.zeros_like(loc[:, :1]), loc[:, None], scale[:, None]

    def outputs(self, x, covariates=None):
        loc, _ = self.encode(x, covariates=self.check_covariates(covariates))
        return {"latent": loc}
