"""The plain VAE: q(z|x) Gaussian, p(z) = N(0, I). The simplest baseline."""
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

    def encode(self, x, training=False):
        return self.z_head(self.z_stack(self.encoder_input(x), training=training))

    def terms(self, x, training=False, noise=None):
        loc, scale = self.encode(x, training)
        z = self.reparameterise(loc, scale, noise)
        reconstruction = self.decoder.log_prob(x, self.decoder(z, training=training))
        kl_z = self.kl_to_prior(loc, scale, z, self.prior())
        elbo = reconstruction - kl_z
        loss = -(reconstruction - self.kl_weight * kl_z)
        return {"loss": loss, "elbo": elbo, "reconstruction": reconstruction, "kl_z": kl_z}

    def log_importance_weights(self, x, n_samples, seed=(0, 0)):
        """log p(x|z) + log N(z; 0, I) - log q(z|x), [S, B], z ~ q(z|x) (stateless draws)."""
        loc, scale = self.encode(x)
        q = tfd.Independent(tfd.Normal(loc[:, None], scale[:, None]), reinterpreted_batch_ndims=1)
        z = loc[:, None] + scale[:, None] * tf.random.stateless_normal(
            tf.stack([tf.shape(loc)[0], n_samples, tf.shape(loc)[1]]), seed)            # [B, S, D]
        # The decoder was built on [B, D] (batch norm fixes the rank): decode the samples flattened.
        params = self.decoder(tf.reshape(z, [-1, self.latent_dim]))
        params = {name: tf.reshape(p, [tf.shape(x)[0], n_samples, -1]) for name, p in params.items()}
        log_w = self.decoder.log_prob(x, params) + self.prior().log_prob(z) - q.log_prob(z)
        return tf.transpose(log_w)

    def outputs(self, x):
        loc, _ = self.encode(x)
        return {"latent": loc}
