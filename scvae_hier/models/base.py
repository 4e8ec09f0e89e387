"""What every model shares: the count decoder, the encoder input transform, the KL weight,
noise sampling, loss trackers and the Keras train/test steps.

A model subclass only says how to compute its per-cell terms (`terms`) and its outputs
(`outputs`); fitting, progress bars, callbacks and `.keras` saving come from Keras.
"""
import keras
import tensorflow as tf
import tensorflow_probability as tfp

from .. import __version__
from .layers import NORMALISATIONS, CountDecoder

tfd = tfp.distributions

FORMAT_VERSION = 1  # bump when saved models stop loading into the new code
INPUT_TRANSFORMS = ("log1p", "none")


class BaseVAE(keras.Model):
    """Shared machinery; subclasses define `term_names`, `terms()` and `outputs()`."""

    term_names = ("loss", "elbo", "reconstruction", "kl_z")

    def __init__(self, n_genes, latent_dim=20, hidden=(100, 100), likelihood="negative_binomial",
                 normalisation="batch", input_transform="none", seed=0, format_version=FORMAT_VERSION,
                 package_version=__version__, **kwargs):
        super().__init__(**kwargs)
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"Unknown input transform {input_transform!r}; choose one of {INPUT_TRANSFORMS}.")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"Unknown normalisation {normalisation!r}; choose one of {NORMALISATIONS}.")
        if int(format_version) != FORMAT_VERSION:
            raise ValueError(
                f"This model was saved in scvae-hier model format {format_version} (package {package_version}); "
                f"this is format {FORMAT_VERSION} (package {__version__}). Install scvae-hier {package_version} "
                f"to use it, or retrain the model with this version.")
        self.n_genes = int(n_genes)
        self.latent_dim = int(latent_dim)
        self.hidden = tuple(int(u) for u in hidden)
        self.likelihood_name = likelihood
        self.normalisation = normalisation
        self.input_transform = input_transform
        self.seed = int(seed)
        self.decoder = CountDecoder(self.n_genes, self.hidden[::-1], likelihood, normalisation, name="decoder")
        self.kl_weight = self.add_weight(shape=(), initializer="ones", trainable=False, name="kl_weight")
        # Noise comes from stateless draws keyed by (seed, draw counter); the counter is a saved
        # weight, so a run resumed from its checkpoint continues the very same noise stream.
        self.noise_draws = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                           name="noise_draws")

    # ------------------------------------------------------------------ pieces for subclasses
    def _init_trackers(self):
        """Call at the end of a subclass __init__, once `term_names` is known."""
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.term_names}

    def encoder_input(self, x):
        return tf.math.log1p(x) if self.input_transform == "log1p" else x

    def sample_noise(self, shape):
        seed = tf.stack([tf.constant(self.seed, tf.int32), tf.convert_to_tensor(self.noise_draws)])
        self.noise_draws.assign_add(1)
        return tf.random.stateless_normal(shape, seed=seed)

    def reparameterise(self, loc, scale, noise=None):
        if noise is None:
            noise = self.sample_noise(tf.shape(loc))
        return loc + scale * noise

    @staticmethod
    def kl_to_prior(loc, scale, z, prior):
        """KL(q(z|.) || prior) per sample: analytic for Normal priors, one-sample MC otherwise."""
        q = tfd.Independent(tfd.Normal(loc, scale), reinterpreted_batch_ndims=1)
        if isinstance(prior, tfd.Independent) and isinstance(prior.distribution, tfd.Normal):
            return tfd.kl_divergence(q, prior)
        return q.log_prob(z) - prior.log_prob(z)

    def prior_sizes(self) -> list:
        """Numbers of prior components to initialise from data (none for a N(0, I) prior)."""
        return []

    def initialise_prior(self, moments: dict) -> None:
        """Set prior components from {K: (centres [K, D], scales [K, D], assignments [n])}."""

    # --------------------------------------------------------------------- subclass contract
    def terms(self, x, training=False, noise=None):
        """Per-cell loss terms (dict of [B] tensors, or scalars for batch-level terms)."""
        raise NotImplementedError

    def outputs(self, x):
        """Per-cell outputs for users: latent means and cluster probabilities."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ Keras plumbing
    def call(self, x, training=False):
        return self.outputs(x)

    def build(self, input_shape=None):
        """Create every weight by running the model once on a dummy batch."""
        x = tf.zeros((2, self.n_genes))
        self.terms(x, noise=None)
        self.outputs(x)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _record(self, terms):
        for name, tracker in self.trackers.items():
            tracker.update_state(tf.reduce_mean(terms[name]))
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    @staticmethod
    def _counts(data):
        return data[0] if isinstance(data, (tuple, list)) else data

    def train_step(self, data):
        x = self._counts(data)
        with tf.GradientTape() as tape:
            terms = self.terms(x, training=True)
            loss = tf.reduce_mean(terms["loss"])
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return self._record(terms)

    def test_step(self, data):
        return self._record(self.terms(self._counts(data), training=False))

    def get_config(self):
        return {**super().get_config(), "n_genes": self.n_genes, "latent_dim": self.latent_dim,
                "hidden": list(self.hidden), "likelihood": self.likelihood_name,
                "normalisation": self.normalisation, "input_transform": self.input_transform,
                "seed": self.seed, "format_version": FORMAT_VERSION, "package_version": __version__}
