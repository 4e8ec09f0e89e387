"""What every model shares: the count decoder, the encoder input transform, the KL weight,
noise sampling, loss trackers and the Keras train/test steps.

A model subclass only says how to compute its per-cell terms (`terms`) and its outputs
(`outputs`); fitting, progress bars, callbacks and `.keras` saving come from Keras.
"""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from .. import __version__
from ..data import CountBatches
from ..choices import INPUT_TRANSFORMS, LIBRARY_SIZES, NORMALISATIONS, check_choice
from .layers import CountDecoder

tfd = tfp.distributions

FORMAT_VERSION = 1  # bump when saved models stop loading into the new code
NORMALISED_TOTAL = 1e4  # normalised_log1p: counts scaled to this total before log1p (Seurat's scale)
NOISE_ALGORITHM = "philox"  # reparameterisation noise: see BaseVAE.sample_noise


def classification_weight_for(label_weight, labels):
    """label_weight x (cells / labelled cells): the weight of -log q(labels|x) per labelled cell
    that makes label_weight weigh the mean over labelled cells against the mean ELBO, whatever the
    share of labelled cells (scANVI's classification ratio). labels: [n, L] codes, -1 unlabelled."""
    labels = np.asarray(labels)
    labelled = int((labels >= 0).any(axis=1).sum())
    return float(label_weight) * len(labels) / max(labelled, 1)


class BaseVAE(keras.Model):
    """Shared machinery and the contract every model fulfils.

    A new model is one file defining a subclass plus one line in `models.MODELS`. It sets
    `term_names` and `clustering`, and implements `arguments_from` (its own constructor arguments
    from the training options and hierarchy), `encode`, `terms`, `outputs` and
    `log_importance_weights`; fitting, progress bars, callbacks and `.keras` saving come from Keras.
    """

    term_names = ("loss", "elbo", "reconstruction", "kl_z")
    # What `outputs` holds besides "latent": "none" (no clusters), "flat" (one clustering,
    # "cluster_probabilities") or "levels" (one per hierarchy level, "level_<l>_probabilities").
    clustering = "none"

    def __init__(self, n_genes, latent_dim=20, hidden=(100, 100), likelihood="negative_binomial",
                 normalisation="batch", input_transform="none", library_size="none", covariates=(),
                 encode_covariates=True, dispersion="cell", seed=0, metadata=None,
                 format_version=FORMAT_VERSION, package_version=__version__, **kwargs):
        super().__init__(**kwargs)
        check_choice("library size", library_size, LIBRARY_SIZES)
        check_choice("input transform", input_transform, INPUT_TRANSFORMS)
        check_choice("normalisation", normalisation, NORMALISATIONS)
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
        self.library_size = library_size
        # Names of the one-hot covariate columns (e.g. the source datasets), in column order.
        self.covariates = tuple(str(c) for c in covariates)
        self.n_covariates = len(self.covariates)
        # False: only the decoder sees the batch (scVI's default), so the latent cannot hold it as input
        self.encode_covariates = bool(encode_covariates)
        self.seed = int(seed)
        # What applying the model to new data needs (genes in order, hierarchy, batch categories,
        # names of the clusters); saved in the model file, see training.model_metadata.
        self.metadata = dict(metadata or {})
        self.dispersion = dispersion
        self.decoder = CountDecoder(self.n_genes, self.hidden[::-1], likelihood, normalisation, dispersion,
                                    name="decoder")
        self.kl_weight = self.add_weight(shape=(), initializer="ones", trainable=False, name="kl_weight")
        # Noise comes from stateless draws keyed by (seed, draw counter); the counter is a saved
        # weight, so a run resumed from its checkpoint continues the very same noise stream.
        self.noise_draws = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                           aggregation="only_first_replica", name="noise_draws")

    # ------------------------------------------------------------------ pieces for subclasses
    semi_supervised = False

    def _init_supervision(self, semi_supervised=False, label_weight=5.0, weight=False):
        """Partial labels (models.supervision): a `classification` term and its weight per labelled
        cell (set by `fit` from the training labels). Call before `_init_trackers`. `weight`: create
        that weight without labels too (TreeVAE's saved files always held it)."""
        self.semi_supervised, self.label_weight = bool(semi_supervised), float(label_weight)
        if self.semi_supervised:
            self.term_names = (*self.term_names, "classification")
        if self.semi_supervised or weight:
            self.classification_weight = self.add_weight(shape=(), initializer=keras.initializers.Constant(label_weight),
                                                         trainable=False, name="classification_weight")

    def add_classification(self, terms, classification, like):
        """Add the classification term (zeros for a batch without labels) to a semi-supervised
        model's terms and loss; `like` is any [B] tensor of the batch."""
        if self.semi_supervised:
            terms["classification"] = tf.zeros_like(like) if classification is None else classification
            terms["loss"] = terms["loss"] + self.classification_weight * terms["classification"]
        return terms

    def _init_trackers(self):
        """Call at the end of a subclass __init__, once `term_names` is known."""
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.term_names}

    def check_covariates(self, covariates):
        """The covariates a model was built with must come with every batch, and only those."""
        if self.n_covariates and covariates is None:
            raise ValueError(f"This model was trained with covariates {list(self.covariates)}; pass their one-hot "
                             f"values [cells, {self.n_covariates}] with the counts.")
        return covariates if self.n_covariates else None

    def encoder_input(self, x, covariates=None):
        """What the encoders see: transformed counts, with the one-hot covariates appended (unless
        `encode_covariates` is off) so that the encoder can discount batch differences instead of
        clustering by them."""
        if self.input_transform == "log1p":
            x = tf.math.log1p(x)
        elif self.input_transform == "normalised_log1p":  # depth-free: the cell's composition only
            x = tf.math.log1p(x * (NORMALISED_TOTAL / self.library(x)))
        if self.n_covariates and self.encode_covariates:
            x = tf.concat([x, tf.cast(covariates, x.dtype)], axis=-1)
        return x

    @staticmethod
    def library(x):
        """Each cell's total count, [B, 1] (at least 1, so empty dummy batches stay finite)."""
        return tf.maximum(tf.reduce_sum(x, axis=-1, keepdims=True), 1.0)

    def decode(self, z, x, covariates=None, training=False, log_library=None):
        """Count-law parameters for latent samples z [B, ..., D] of the cells x [B, G].

        One-hot covariates [B, C] are appended to every sample of z, so the decoder can put a
        batch's shift in expression into the covariate instead of the latent. With
        library_size="observed" the decoder's mean head gives gene proportions, scaled by the
        cell's observed total count (scVI's size factor), so z need not encode sequencing depth.
        `log_library` [B] replaces the totals of x (for sampling new cells, where x is None)."""
        extra_axes = len(z.shape) - 2
        if self.n_covariates:
            c = tf.reshape(tf.cast(covariates, z.dtype), [-1] + [1] * extra_axes + [self.n_covariates])
            z = tf.concat([z, tf.broadcast_to(c, tf.concat([tf.shape(z)[:-1], [self.n_covariates]], 0))], axis=-1)
        params = self.decoder(z, training=training)
        if self.library_size == "observed":
            if log_library is None:
                log_library = tf.math.log(self.library(x))
            log_library = tf.reshape(log_library, [-1] + [1] * (extra_axes + 1))
            params = self.decoder.scale_to_library(params, log_library)
        return params

    def sample_noise(self, shape):
        """Standard normal noise [cells, ...] from the stateless seed (model seed, draw counter).

        Under a tf.distribute strategy every replica draws the noise of the whole global batch and
        keeps its own rows, so replicas draw different noise and a run on N devices draws exactly
        what one device would for the same global batch (reproducible, and tested).

        Philox by name: without XLA it is the stream the default "auto_select" draws on CPU
        (tested; TensorFlow documents the default's output as the same on GPU), so no result
        changes there, while under XLA on CPU "auto_select" compiles to a slower generator: about
        3 ms of a 23-26 ms MixtureVAE step (benchmarks/step_breakdown.py)."""
        seed = tf.stack([tf.constant(self.seed, tf.int32), tf.convert_to_tensor(self.noise_draws)])
        self.noise_draws.assign_add(1)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return tf.random.stateless_normal(shape, seed=seed, alg=NOISE_ALGORITHM)
        sizes = context.all_gather(tf.reshape(shape[0], [1]), axis=0)              # cells per replica
        offset = tf.reduce_sum(sizes[:context.replica_id_in_sync_group])
        noise = tf.random.stateless_normal(tf.concat([[tf.reduce_sum(sizes)], shape[1:]], 0), seed=seed,
                                         alg=NOISE_ALGORITHM)
        return noise[offset:offset + shape[0]]

    @staticmethod
    def global_mean(per_cell):
        """Mean over the global batch. Under tf.distribute each replica holds part of the batch and
        the optimizer sums the replicas' gradients, so each replica divides its own sum by the
        global number of cells (a per-replica mean would give N-fold gradients on N replicas)."""
        n = tf.cast(tf.shape(per_cell)[0], per_cell.dtype)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            n = context.all_reduce("sum", n)
        return tf.reduce_sum(per_cell) / n

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
    @classmethod
    def arguments_from(cls, options, hierarchy) -> dict:
        """This model's own constructor arguments (beyond the shared ones) from the training
        options and the hierarchy (None without labels). Raise ValueError naming the fix."""
        return {}

    def encode(self, x, training=False, covariates=None):
        """The posterior's parameters for a batch of counts (model-specific structure)."""
        raise NotImplementedError

    def log_importance_weights(self, x, n_samples, seed=(0, 0), covariates=None):
        """[S, B] log p(x, z_s) - log q(z_s|x) for S stateless draws z_s ~ q(z|x), every discrete
        variable summed out of both, so that log-mean-exp over S bounds log p(x) (the IWAE)."""
        raise NotImplementedError

    def posterior_mixture(self, x, covariates=None):
        """q(z|x) as a mixture of diagonal Gaussians: log weights [B, K] and loc, scale [B, K, D]
        (K = 1 where q(z|x) has no discrete part), for drawing latents (`mixture.draw_latent`)."""
        raise NotImplementedError

    def level_predictions(self, level_probabilities, labels=None) -> list:
        """Each level's cluster per cell from its posterior q(y_l|x) ([n, K_l] numpy arrays, coarse
        to fine): the argmax of each level on its own. A model whose predictions must nest
        (TreeVAE, the semi-supervised models) overrides this, and then takes labels ([n, L]
        codes, -1 unlabelled) to keep a labelled cell's path through its labels."""
        return [np.asarray(p).argmax(axis=1) for p in level_probabilities]

    def prior_mixture(self):
        """The prior p(z) as one mixture: (log weights [M], component distribution with batch [M],
        class index of each component at every level [L, M] (-1: none), or None for a flat model).
        Sampling from a hierarchy node keeps the components under it."""
        raise NotImplementedError(f"{type(self).__name__} has no mixture prior to sample clusters from.")

    def terms(self, x, training=False, noise=None, covariates=None):
        """Per-cell loss terms (dict of [B] tensors, or scalars for batch-level terms)."""
        raise NotImplementedError

    def outputs(self, x, covariates=None):
        """Per-cell outputs for users: latent means and cluster probabilities."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ Keras plumbing
    def call(self, inputs, training=False):
        return self.outputs(*self._unpack(inputs))

    def build(self, input_shape=None):
        """Create every weight by running the model once on a dummy batch."""
        x = tf.zeros((2, self.n_genes))
        covariates = tf.zeros((2, self.n_covariates)) if self.n_covariates else None
        self.terms(x, noise=None, covariates=covariates)
        self.outputs(x, covariates=covariates)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _record(self, terms):
        for name, tracker in self.trackers.items():
            tracker.update_state(tf.reduce_mean(terms[name]))
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def _unpack(self, data):
        """(counts, covariates or None) from a batch: a dict as CountBatches gives ("counts", and
        "covariates" for a model trained with a batch covariate; room for labels and masks), or
        bare counts. Keras may wrap the dict in a 1-tuple (inputs without targets)."""
        if isinstance(data, (tuple, list)) and len(data) == 1:
            data = data[0]
        if isinstance(data, dict):
            return data["counts"], self.check_covariates(data.get("covariates"))
        if isinstance(data, (tuple, list)):
            raise TypeError("Pass batches as a dict {'counts': x, 'covariates': c} (or counts alone), "
                            "as scvae_hier.data.CountBatches gives them.")
        return data, self.check_covariates(None)

    @staticmethod
    def _labels(data) -> dict:
        """{"labels": [B, L] class codes, -1 unlabelled} when a semi-supervised batch carries them."""
        if isinstance(data, (tuple, list)) and len(data) == 1:
            data = data[0]
        return {"labels": data["labels"]} if isinstance(data, dict) and "labels" in data else {}

    def fit(self, x=None, *args, validation_data=None, **kwargs):
        """Keras's fit; CountBatches held in memory go in as native tf.data pipelines
        (CountBatches.as_dataset: the same batches, without Keras's Python generator per batch).
        Keras calls a PyDataset's on_epoch_end once before its first epoch, so epoch e of a fit
        (with shuffle=False, as training.fit passes) read the order of epoch counter x.epoch + 1 + e:
        the pipeline starts there, so a run trained (or resumed) either way sees the same batches."""
        if self.semi_supervised and getattr(x, "labels", None) is not None:
            self.classification_weight.assign(classification_weight_for(self.label_weight, x.labels))
        if isinstance(x, CountBatches) and x.in_memory:
            kwargs.setdefault("steps_per_epoch", len(x))
            kwargs["shuffle"] = False   # the CountBatches shuffles its cells itself, every epoch
            x = x.as_dataset(first_epoch=x.epoch + 1) if x.shuffle else x.as_dataset().repeat()
        if isinstance(validation_data, CountBatches) and validation_data.in_memory:
            validation_data = validation_data.as_dataset()
        return super().fit(x, *args, validation_data=validation_data, **kwargs)

    @property
    def jit_compile(self):
        return keras.Model.jit_compile.fget(self)

    @jit_compile.setter
    def jit_compile(self, value):
        """Keras's setter (compile, and loading a compiled model, go through it); the count law's
        lgamma terms then take the form that is fastest under that compilation (gather-free and
        fused with XLA, sparse without; both exact). Not an override of compile(): Keras would
        then skip compiling a loaded model (no optimizer state to resume with)."""
        keras.Model.jit_compile.fset(self, value)
        self.decoder.fused_lgamma = bool(self._jit_compile)

    def train_step(self, data):
        x, covariates = self._unpack(data)
        with tf.GradientTape() as tape:
            terms = self.terms(x, training=True, covariates=covariates, **self._labels(data))
            loss = self.global_mean(terms["loss"])
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return self._record(terms)

    def test_step(self, data):
        x, covariates = self._unpack(data)
        return self._record(self.terms(x, training=False, covariates=covariates, **self._labels(data)))

    def predict_step(self, data):
        return self.outputs(*self._unpack(data))

    def get_config(self):
        return {**super().get_config(), "n_genes": self.n_genes, "latent_dim": self.latent_dim,
                "hidden": list(self.hidden), "likelihood": self.likelihood_name,
                "normalisation": self.normalisation, "input_transform": self.input_transform,
                "library_size": self.library_size, "covariates": list(self.covariates),
                "encode_covariates": self.encode_covariates,
                "dispersion": self.dispersion, "seed": self.seed, "metadata": self.metadata,
                "format_version": FORMAT_VERSION, "package_version": __version__}
