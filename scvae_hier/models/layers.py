"""Network building blocks shared by every model: MLP stacks, Gaussian heads, the count decoder
and the learnable prior components."""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import numpy as np
import tensorflow as tf

from ..distributions import (LOG_R_RANGE, component_law, dense_lgamma_ratio_sum, get_likelihood, lgamma_ratio_sum,
                             nested_mixture_prior, rising_lgamma_ratio, rising_lgamma_ratio_sum)
from ..tree_shape import TREE_SHRINK

NORMALISATIONS = ("batch", "layer", "none")
DISPERSIONS = ("cell", "gene")


def _normalisation(kind: str):
    if kind == "batch":
        return keras.layers.BatchNormalization()
    if kind == "layer":
        return keras.layers.LayerNormalization()
    if kind == "none":
        return None
    raise ValueError(f"Unknown normalisation {kind!r}; choose one of {NORMALISATIONS}.")


@keras.saving.register_keras_serializable("scvae_hier")
class DenseStack(keras.layers.Layer):
    """Dense -> (batch/layer norm) -> ReLU, repeated; acts on the last axis of any-rank input.

    With `n_categories`, the first layer also adds a learned vector per category, which equals a
    dense layer on [h, onehot(y)] evaluated for every y at once: output shape [B, K, units]
    computed with one matrix product instead of K (how q(z|x,y) sees all clusters cheaply).
    """

    def __init__(self, units=(100, 100), normalisation="batch", n_categories=0, **kwargs):
        super().__init__(**kwargs)
        self.units = tuple(int(u) for u in units)
        self.normalisation = normalisation
        self.n_categories = int(n_categories)
        self.dense = [keras.layers.Dense(u) for u in self.units]
        self.norms = [_normalisation(normalisation) for _ in self.units]
        if self.n_categories:
            self.category_bias = self.add_weight(
                shape=(self.n_categories, self.units[0]), initializer="glorot_uniform", name="category_bias")

    def call(self, h, training=False):
        for i, (dense, norm) in enumerate(zip(self.dense, self.norms)):
            h = dense(h)
            if i == 0 and self.n_categories:
                h = tf.expand_dims(h, -2) + self.category_bias
            if norm is not None:
                h = norm(h, training=training)
            h = tf.nn.relu(h)
        return h

    def get_config(self):
        return {**super().get_config(), "units": list(self.units),
                "normalisation": self.normalisation, "n_categories": self.n_categories}


@keras.saving.register_keras_serializable("scvae_hier")
class GaussianHead(keras.layers.Layer):
    """Mean and softplus scale of a diagonal Gaussian q(z|...)."""

    def __init__(self, latent_dim, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = int(latent_dim)
        self.loc = keras.layers.Dense(self.latent_dim)
        self.raw_scale = keras.layers.Dense(self.latent_dim)

    def call(self, h):
        return self.loc(h), tf.nn.softplus(self.raw_scale(h)) + 1e-4

    def get_config(self):
        return {**super().get_config(), "latent_dim": self.latent_dim}


@keras.saving.register_keras_serializable("scvae_hier")
class CountDecoder(keras.layers.Layer):
    """p(x|z): an MLP on z with one linear head per likelihood parameter (per gene).

    dispersion="gene" (negative-binomial laws only) replaces the per-cell log r head by one learned
    log r per gene, as scVI does. Then lgamma(x + r) - lgamma(r), the costliest part of the
    density, no longer depends on z, so it is computed once per cell rather than once per
    cluster or path."""

    def __init__(self, n_genes, hidden=(100, 100), likelihood="negative_binomial", normalisation="batch",
                 dispersion="cell", **kwargs):
        super().__init__(**kwargs)
        self.n_genes = int(n_genes)
        self.hidden = tuple(int(u) for u in hidden)
        self.likelihood_name = likelihood
        self.likelihood = get_likelihood(likelihood)
        self.normalisation = normalisation
        if dispersion not in DISPERSIONS:
            raise ValueError(f"Unknown dispersion {dispersion!r}; choose one of {DISPERSIONS}.")
        if dispersion == "gene" and "log_r" not in self.likelihood.params:
            raise ValueError(f"--dispersion gene applies to negative-binomial likelihoods, not {likelihood!r}.")
        self.dispersion = dispersion
        self.stack = DenseStack(self.hidden, normalisation)
        shared = ("log_r",) if dispersion == "gene" else ()
        self.heads = {name: keras.layers.Dense(self.n_genes, name=name)
                      for name in self.likelihood.heads if name not in shared}
        if shared:
            self.gene_log_r = self.add_weight(shape=(self.n_genes,), initializer="zeros", name="gene_log_r")

    def call(self, z, training=False):
        h = self.stack(z, training=training)
        params = {name: head(h) for name, head in self.heads.items()}
        if self.dispersion == "gene":
            params["log_r"] = tf.broadcast_to(self.gene_log_r, tf.shape(params["logits"]))
        return params

    def scale_to_library(self, params, log_library):
        """Make the mean-setting head a gene composition times the library: mean = softmax(head) * L.

        `log_library` is log L broadcastable to the parameters ([B, 1, ...]). For the negative
        binomial (mean r p / (1 - p) = exp(log r + logits)) the logits become log mean - log r, with
        log r clipped as the log-density clips it, so the mean is exactly softmax(head) * L."""
        params = dict(params)
        if "log_rate" in params:
            params["log_rate"] = tf.nn.log_softmax(params["log_rate"]) + log_library
        else:
            log_mean = tf.nn.log_softmax(params["logits"]) + log_library
            params["logits"] = log_mean - tf.clip_by_value(params["log_r"], *LOG_R_RANGE)
        return params

    # distributions.lgamma_ratio_sum evaluates the lgamma terms at non-zero counts only (per-cell
    # dispersion); tests and benchmarks/count_law_speed.py set other sums on an instance.
    lgamma_ratio_sum = staticmethod(lgamma_ratio_sum)
    # True when the model's steps are XLA-compiled (BaseVAE's jit_compile setter sets it): the lgamma terms then
    # use the gather-free rising-factorial form, which XLA fuses and which is fastest there.
    fused_lgamma = False
    # The batch size the packed non-zero entries are sized for (a static shape for XLA, while Keras
    # traces with an unknown batch size); training.fit sets the training batch size.
    sparse_batch_cells = 128

    def log_prob(self, x, params):
        """Sum over genes of log p(x|z); x of shape [B, G] broadcasts over extra axes of params
        (clusters or paths), and the parameter-free log x! is computed once per cell.

        For the negative-binomial laws the costly lgamma(x + r) - lgamma(r) is 0 where x = 0, so it
        is summed apart (see _lgamma_ratio) and added to the cheap rest of the density."""
        # log x! = lgamma(x + 1) - lgamma(1), the rising factorial of 1 (the fused form under XLA)
        log_factorial = rising_lgamma_ratio(x, tf.ones_like(x)) if self.fused_lgamma else tf.math.lgamma(x + 1.0)
        per_cell = -tf.reduce_sum(log_factorial, axis=-1)
        extra_axes = len(params[self.likelihood.params[0]].shape) - len(x.shape)
        x_wide = x
        for _ in range(extra_axes):
            x_wide = tf.expand_dims(x_wide, 1)
            per_cell = tf.expand_dims(per_cell, 1)
        if "log_r" not in self.likelihood.params:
            return tf.reduce_sum(self.likelihood.log_prob_plus_log_factorial(x_wide, params), axis=-1) + per_cell
        r = tf.exp(tf.clip_by_value(params["log_r"], *LOG_R_RANGE))
        extra = {"dropout_logits": params["dropout_logits"]} if self.likelihood.zero_inflated else {}
        rest = self.likelihood.lgamma_free_fn(x_wide, r, params["logits"], **extra)
        return tf.reduce_sum(rest, axis=-1) + self._lgamma_ratio(x, r, extra_axes) + per_cell

    def _lgamma_ratio(self, x, r, extra_axes):
        """Sum over genes of lgamma(x + r) - lgamma(r) for x [B, G] and r [B, ..., G]: once per
        cell ([B, 1, ...]) with one dispersion per gene, else per cluster or path ([B, ...]).

        Once per cell it is only B x G entries, and measured (benchmarks/count_law_speed.py) the
        gather of the sparse path then costs more than it saves, so that sum stays dense."""
        if self.dispersion == "gene":
            r_gene = tf.exp(tf.clip_by_value(self.gene_log_r, *LOG_R_RANGE))
            dense = rising_lgamma_ratio_sum if self.fused_lgamma else dense_lgamma_ratio_sum
            ratio = dense(x, tf.broadcast_to(r_gene, tf.shape(x))[:, None, :])                     # [B, 1]
            return tf.reshape(ratio, [-1] + [1] * extra_axes)
        shape = tf.shape(r)
        r = tf.reshape(r, tf.stack([shape[0], -1, shape[-1]]))
        if self.fused_lgamma:
            ratio = rising_lgamma_ratio_sum(x, r)                                                 # [B, M]
        else:
            ratio = self.lgamma_ratio_sum(x, r, self.sparse_batch_cells)
        return tf.reshape(ratio, shape[:-1])

    def get_config(self):
        return {**super().get_config(), "n_genes": self.n_genes, "hidden": list(self.hidden),
                "likelihood": self.likelihood_name, "normalisation": self.normalisation,
                "dispersion": self.dispersion}


def _inverse_softplus(y):
    return float(np.log(np.expm1(y)))


class ComponentLaw:
    """Scales, Student-t degrees of freedom and the TFP distribution from a component layer's raw
    weights (`loc`, `raw_scale`, `raw_df`, `law`): shared by the flat and the tree-path layers."""

    @property
    def scale(self):
        return tf.nn.softplus(self.raw_scale) + 1e-4

    @property
    def df(self):
        return 1.0 + tf.nn.softplus(self.raw_df) if self.law == "student-t" else None

    def distribution(self):
        return component_law(self.law, self.loc, self.scale, self.df)


@keras.saving.register_keras_serializable("scvae_hier")
class PriorComponents(ComponentLaw, keras.layers.Layer):
    """Learnable components p(z | path) with batch shape `shape` (e.g. [K] or [K_1, ..., K_L]).

    Each call of `distribution()` builds a fresh TFP distribution from the current weights.
    """

    def __init__(self, shape, latent_dim, law="normal", **kwargs):
        super().__init__(**kwargs)
        self.component_shape = tuple(int(k) for k in shape)
        self.latent_dim = int(latent_dim)
        self.law = law
        full = self.component_shape + (self.latent_dim,)
        # Means start close together (as scVAE's): far-apart random means leave most components
        # unused from the first epoch (measured: 2.6 of 9 in use vs 8.5 with this start).
        self.loc = self.add_weight(shape=full, initializer=keras.initializers.RandomNormal(stddev=0.01), name="loc")
        self.raw_scale = self.add_weight(
            shape=full, initializer=keras.initializers.Constant(_inverse_softplus(1.0)), name="raw_scale")
        if law == "student-t":
            # df = 1 + softplus(raw): the mean exists, tails may be heavy; starts at df = 5.
            self.raw_df = self.add_weight(
                shape=self.component_shape + (1,), initializer=keras.initializers.Constant(_inverse_softplus(4.0)),
                name="raw_df")

    def set_moments(self, loc, scale):
        """Initialise locations and scales (e.g. from k-means on a PCA of the data)."""
        self.loc.assign(np.asarray(loc, dtype="float32").reshape(self.loc.shape))
        scale = np.maximum(np.asarray(scale, dtype="float32"), 1e-3)
        self.raw_scale.assign(np.log(np.expm1(scale)).reshape(self.raw_scale.shape))

    def get_config(self):
        return {**super().get_config(), "shape": list(self.component_shape), "latent_dim": self.latent_dim, "law": self.law}


@keras.saving.register_keras_serializable("scvae_hier")
class TreeComponents(keras.layers.Layer):
    """Components p(z | y_1..y_L) located at a sum of per-level class offsets,
    mu(y_1..y_L) = sum_l 2^-(l-1) delta_l[y_l], with scale (and df) per finest class.

    A level-l class has one offset whatever its parent, so it is the same class under every
    parent (the soft hierarchy), and leaves that share ancestors share their offsets: coarse
    classes are regions of the latent space, not arbitrary groupings of leaves. The halving
    factor makes coarse offsets dominate at the start and learn fastest.
    """

    def __init__(self, sizes, latent_dim, law="normal", **kwargs):
        super().__init__(**kwargs)
        self.component_shape = tuple(int(k) for k in sizes)
        self.latent_dim = int(latent_dim)
        self.law = law
        self.offsets = [self.add_weight(shape=(k, self.latent_dim), initializer=keras.initializers.RandomNormal(stddev=1.0),
                                        name=f"level_{level + 1}_offsets")
                        for level, k in enumerate(self.component_shape)]
        leaf = (self.component_shape[-1], self.latent_dim)
        self.raw_scale = self.add_weight(shape=leaf, initializer=keras.initializers.Constant(_inverse_softplus(1.0)),
                                         name="raw_scale")
        if law == "student-t":
            self.raw_df = self.add_weight(shape=leaf[:1] + (1,),
                                          initializer=keras.initializers.Constant(_inverse_softplus(4.0)), name="raw_df")

    def _at_level(self, values, level):
        """Broadcast a per-class tensor [K_level, d] of one level to every path [K_1..K_L, d]."""
        n = len(self.component_shape)
        shape = [1] * n + [values.shape[-1]]
        shape[level] = self.component_shape[level]
        return tf.broadcast_to(tf.reshape(values, shape), self.component_shape + (values.shape[-1],))

    @property
    def loc(self):
        return tf.add_n([self._at_level(offset * TREE_SHRINK ** level, level) for level, offset in enumerate(self.offsets)])

    @property
    def scale(self):
        return self._at_level(tf.nn.softplus(self.raw_scale) + 1e-4, len(self.component_shape) - 1)

    @property
    def df(self):
        if self.law != "student-t":
            return None
        return self._at_level(1.0 + tf.nn.softplus(self.raw_df), len(self.component_shape) - 1)

    def distribution(self):
        return component_law(self.law, self.loc, self.scale, self.df)

    def set_level_moments(self, centres, scales, parents):
        """Initialise from per-level centres (list of [K_l, D]), finest-level scales and, per level
        l > 1, each class's most likely parent: offsets are centre minus parent centre."""
        for level, offset in enumerate(self.offsets):
            delta = centres[level] - (centres[level - 1][parents[level]] if level else 0.0)
            offset.assign((np.asarray(delta) / TREE_SHRINK ** level).astype("float32"))
        scale = np.maximum(np.asarray(scales, dtype="float32"), 1e-3)
        self.raw_scale.assign(np.log(np.expm1(scale)))

    def get_config(self):
        return {**super().get_config(), "sizes": list(self.component_shape), "latent_dim": self.latent_dim,
                "law": self.law}


COMPONENT_MEANS = ("tree", "path")


@keras.saving.register_keras_serializable("scvae_hier")
class NestedPrior(keras.layers.Layer):
    """The mixture-of-mixtures prior: p(y_1), soft transitions p(y_l | y_<l) and components
    p(z | y_1..y_L) with batch shape [K_1, ..., K_L].

    Transitions are logits over every prefix, so a level-l class can sit under several parents
    with some probability; `transitions="uniform"` fixes them (and p(y_1)) uniform.
    """

    def __init__(self, sizes, latent_dim, law="normal", transitions="learnable", component_means="tree", **kwargs):
        super().__init__(**kwargs)
        if component_means not in COMPONENT_MEANS:
            raise ValueError(f"Unknown component means {component_means!r}; choose one of {COMPONENT_MEANS}.")
        self.sizes = tuple(int(k) for k in sizes)
        self.latent_dim = int(latent_dim)
        self.law = law
        self.transitions = transitions
        self.component_means = component_means
        components = TreeComponents if component_means == "tree" else PriorComponents
        self.components = components(self.sizes, self.latent_dim, law, name="components")
        self.level_logits = [
            self.add_weight(shape=self.sizes[: level + 1], initializer="zeros",
                            trainable=transitions == "learnable", name=f"level_{level + 1}_logits")
            for level in range(len(self.sizes))]

    def level_log_probs(self):
        """log p(y_l | y_<l) per level, shapes [K_1, ..., K_l]."""
        return [tf.nn.log_softmax(logits, axis=-1) for logits in self.level_logits]

    def distribution(self):
        """p(z) as TFP MixtureSameFamily nested once per level."""
        return nested_mixture_prior(list(self.level_logits), self.components.distribution())

    def flat_components(self):
        """The components with their path axes flattened: batch shape [K_1 * ... * K_L]."""
        c = self.components
        flat = (-1, self.latent_dim)
        df = None if c.law == "normal" else tf.reshape(c.df, (-1, 1))
        return component_law(c.law, tf.reshape(c.loc, flat), tf.reshape(c.scale, flat), df)

    def get_config(self):
        return {**super().get_config(), "sizes": list(self.sizes), "latent_dim": self.latent_dim,
                "law": self.law, "transitions": self.transitions, "component_means": self.component_means}
