"""Count likelihoods p(x|z) and latent priors p(z|y).

Likelihood log-densities are written out with lgamma so that they are cheap, XLA-friendly and
checked against scipy in the tests. Priors are TFP distributions rebuilt from Keras weights on
every call (a TFP object kept as an attribute would hold stale copies and lose gradients).
"""
from . import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
from dataclasses import dataclass
from typing import Callable

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

LOG_R_RANGE = (-10.0, 10.0)  # scVAE clips the NB log-dispersion to this range
LOG_RATE_RANGE = (-15.0, 15.0)


# The laws below leave out the -log(x!) term, which does not depend on the parameters: the
# decoder adds it once per cell and gene instead of once per cluster or path (lgamma is costly).
def negative_binomial_log_prob(x, log_r, logits):
    """log NB(x; r, p) + log x!, with p = sigmoid(logits): the TFP/scVAE parametrisation, mean r*p/(1-p)."""
    r = tf.exp(tf.clip_by_value(log_r, *LOG_R_RANGE))
    return lgamma_ratio(x, r) + negative_binomial_rate_terms(x, r, logits)


def negative_binomial_rate_terms(x, r, logits):
    """The NB log-density less lgamma(x + r) - lgamma(r) (and log x!): x log p + r log(1 - p).

    Elementwise and cheap; the decoder adds the lgamma ratio with `lgamma_ratio_sum`."""
    return x * tf.math.log_sigmoid(logits) + r * tf.math.log_sigmoid(-logits)


def lgamma_ratio(x, r):
    """lgamma(x + r) - lgamma(r), the costly part of the NB log-density: exactly 0 (and so is its
    gradient, digamma(r) - digamma(r)) where x = 0, which is 80-90% of single-cell counts."""
    return tf.math.lgamma(x + r) - tf.math.lgamma(r)


def dense_lgamma_ratio_sum(x, r):
    """sum over genes of lgamma_ratio for every entry: x [B, G], r [B, M, G] -> [B, M]."""
    return tf.reduce_sum(lgamma_ratio(x[:, None, :], r), axis=-1)


def nonzero_genes(x, capacity):
    """Per cell, the indices of its non-zero genes in ascending order, then zero-count genes up to
    a static `capacity`: [B, G] -> [B, capacity]. top_k ranks the mask's ones first and breaks
    ties by lower index; the padding genes have x = 0, so they add exactly 0 and need no mask."""
    return tf.math.top_k(tf.cast(x > 0, x.dtype), k=capacity).indices


def sparse_lgamma_ratio_sum(x, r, capacity):
    """dense_lgamma_ratio_sum over each cell's non-zero genes only: exact when no cell has more
    than `capacity` of them. Gathers x and r at those genes ([B, M, G] -> [B, M, capacity]);
    gradients reach r through the gather."""
    genes = nonzero_genes(x, capacity)
    x_nonzero = tf.gather(x, genes, batch_dims=1)[:, None, :]          # [B, 1, C]
    r_nonzero = tf.gather(r, genes, batch_dims=1, axis=2)               # [B, M, C]
    return tf.reduce_sum(lgamma_ratio(x_nonzero, r_nonzero), axis=-1)


# The sparse path gathers this share of the genes per cell (a static shape, as XLA needs); a batch
# with a cell having more non-zero counts takes the dense path. In the PBMC data a cell has 13% (500
# genes) or 9% (2,000 genes) of its counts non-zero, and the densest cell of a batch of 128 at most 48%.
SPARSE_SHARE = 0.5
# The whole batch's non-zero entries vary far less than its densest cell's: 13% (500 genes) or 9%
# (2,000 genes) of a PBMC batch of 128, at most 14% over 16 batches. Packing them flat with room for
# a quarter of the entries does a quarter of the dense work (measured: benchmarks/count_law_speed.py).
BATCH_SPARSE_SHARE = 0.25


def batch_nonzero_entries(x, capacity):
    """The batch's non-zero counts as flat indices (cell x G + gene) and values, packed in order
    into a static `capacity` of slots; unused slots hold index 0 with value 0, which add exactly 0.
    A cumulative sum gives each non-zero entry its slot (no sort); entries past the capacity go to
    a spill slot that is dropped, so callers check the count first."""
    flat = tf.reshape(x, [-1])
    nonzero = flat > 0
    slot = tf.where(nonzero, tf.minimum(tf.cumsum(tf.cast(nonzero, tf.int32)) - 1, capacity), capacity)[:, None]
    index = tf.scatter_nd(slot, tf.range(tf.size(flat)), [capacity + 1])[:capacity]
    values = tf.scatter_nd(slot, flat, [capacity + 1])[:capacity]
    return index, values


def batch_sparse_lgamma_ratio_sum(x, r, capacity):
    """dense_lgamma_ratio_sum over the batch's non-zero entries only: exact when the batch has at
    most `capacity` of them. Gathers r at those entries ([B, M, G] -> [capacity, M]) and sums the
    terms back per cell; gradients reach r through the gather."""
    index, values = batch_nonzero_entries(x, capacity)
    r_by_entry = tf.reshape(tf.transpose(r, [0, 2, 1]), tf.stack([-1, tf.shape(r)[1]]))   # [B x G, M]
    terms = lgamma_ratio(values[:, None], tf.gather(r_by_entry, index))                    # [capacity, M]
    return tf.math.unsorted_segment_sum(terms, index // x.shape[-1], tf.shape(x)[0])


def lgamma_ratio_sum(x, r, batch_cells=None):
    """sum over genes of lgamma(x + r) - lgamma(r), x [B, G], r [B, M, G] -> [B, M], over the
    non-zero counts only, exact in every case (XLA compiles each branch once), the first that fits:
    - the batch's non-zero entries packed flat, room for BATCH_SPARSE_SHARE of the entries of a
      batch of `batch_cells` cells (default: the batch's static size; Keras traces training with an
      unknown one, so the model passes its training batch size);
    - each cell's non-zero genes, room for SPARSE_SHARE of the genes per cell;
    - every entry (dense)."""
    genes = x.shape[-1]
    batch_cells = x.shape[0] if x.shape[0] is not None else batch_cells
    per_cell = int(SPARSE_SHARE * genes)
    per_batch = int(BATCH_SPARSE_SHARE * batch_cells * genes) if batch_cells else 0

    def cell_or_dense():
        if per_cell < 1:
            return dense_lgamma_ratio_sum(x, r)
        fits = tf.reduce_max(tf.math.count_nonzero(x, axis=-1)) <= per_cell
        return tf.cond(fits, lambda: sparse_lgamma_ratio_sum(x, r, per_cell), lambda: dense_lgamma_ratio_sum(x, r))

    if per_batch < 1:
        return cell_or_dense()
    fits = tf.math.count_nonzero(x, dtype=tf.int32) <= per_batch
    return tf.cond(fits, lambda: batch_sparse_lgamma_ratio_sum(x, r, per_batch), cell_or_dense)


# lgamma(x + r) - lgamma(r) = log[r (r + 1) ... (r + x - 1)] for an integer count x (the rising
# factorial): the first RISING_TERMS factors are multiplied out, the rest (x > RISING_TERMS) come
# from Stirling's series, accurate to float32 for arguments >= RISING_TERMS.
RISING_TERMS = 4


def _stirling_remainder(z):
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi) / 2] for z >= 4 (four terms of Stirling's series;
    the next is below 1e-8 there)."""
    w = 1.0 / (z * z)
    return (1.0 / 12.0 - w * (1.0 / 360.0 - w * (1.0 / 1260.0 - w / 1680.0))) / z


def rising_lgamma_ratio(x, r):
    """lgamma(x + r) - lgamma(r) for integer counts x >= 0, elementwise and without lgamma:
    log of the product of the first min(x, 4) factors r + j, plus for x > 4 the Stirling difference
    lgamma(x + r) - lgamma(r + 4), written so that nothing cancels (a = r + 4, d = x - 4:
    d log(a + d) + (a - 1/2) log1p(d / a) - d + remainders). Exact 0 with zero gradient at x = 0.

    Why: under XLA these few multiplies and logs fuse with the rest of the density, which makes it
    the fastest form there (benchmarks/count_law_speed.py); it is also closer to scipy than the
    float32 lgamma difference, which loses digits when r is large."""
    capped = tf.minimum(x, float(RISING_TERMS))
    product = tf.ones_like(r)
    for j in range(RISING_TERMS):
        product = product * tf.where(capped > j, r + j, 1.0)
    a = r + RISING_TERMS
    d = tf.maximum(x - RISING_TERMS, 0.0)
    tail = d * tf.math.log(a + d) + (a - 0.5) * tf.math.log1p(d / a) - d + _stirling_remainder(a + d) \
        - _stirling_remainder(a)
    return tf.math.log(product) + tail


def rising_lgamma_ratio_sum(x, r):
    """dense_lgamma_ratio_sum by rising_lgamma_ratio: x [B, G], r [B, M, G] -> [B, M]. No gather,
    so under XLA it costs little more than no lgamma terms at all; without XLA the sparse sums of
    lgamma_ratio_sum are faster."""
    return tf.reduce_sum(rising_lgamma_ratio(x[:, None, :], r), axis=-1)


def negative_binomial_mean(log_r, logits):
    return tf.exp(tf.clip_by_value(log_r, *LOG_R_RANGE) + logits)


def poisson_log_prob(x, log_rate):
    """log Poisson(x; rate) + log x!."""
    log_rate = tf.clip_by_value(log_rate, *LOG_RATE_RANGE)
    return x * log_rate - tf.exp(log_rate)


def poisson_mean(log_rate):
    return tf.exp(tf.clip_by_value(log_rate, *LOG_RATE_RANGE))


def zero_inflated(log_prob: Callable, mean: Callable):
    """Wrap a count law with a structural-zero probability pi = sigmoid(dropout_logits).

    Still without -log x!, which is 0 at x = 0, so adding it later stays exact."""

    def zi_log_prob(x, *params, dropout_logits):
        base = log_prob(x, *params)
        log_pi = tf.math.log_sigmoid(dropout_logits)
        log_not_pi = tf.math.log_sigmoid(-dropout_logits)
        log_zero = tf.reduce_logsumexp(tf.stack([log_pi + tf.zeros_like(base), log_not_pi + base]), axis=0)
        return tf.where(tf.equal(x, 0.0), log_zero, log_not_pi + base)

    def zi_mean(*params, dropout_logits):
        return tf.sigmoid(-dropout_logits) * mean(*params)

    return zi_log_prob, zi_mean


@dataclass(frozen=True)
class Likelihood:
    """A count law: the decoder heads it needs, its log-density and its mean."""
    name: str
    params: tuple
    log_prob_fn: Callable
    mean_fn: Callable
    zero_inflated: bool = False
    # Negative-binomial laws only: the log-density less lgamma(x + r) - lgamma(r) and log x!, as a
    # function of (x, r, logits[, dropout_logits=]); the lgamma ratio is 0 at x = 0, so adding it
    # back over the non-zero counts (lgamma_ratio_sum) gives the whole density, zero-inflated too.
    lgamma_free_fn: Callable = None

    @property
    def heads(self) -> tuple:
        return self.params + (("dropout_logits",) if self.zero_inflated else ())

    def _split(self, params: dict):
        base = [params[p] for p in self.params]
        extra = {"dropout_logits": params["dropout_logits"]} if self.zero_inflated else {}
        return base, extra

    def log_prob_plus_log_factorial(self, x, params: dict):
        """Per-gene log p(x|params) + log x!; x broadcasts against the parameters."""
        base, extra = self._split(params)
        return self.log_prob_fn(x, *base, **extra)

    def log_prob(self, x, params: dict):
        """Per-gene log p(x|params)."""
        return self.log_prob_plus_log_factorial(x, params) - tf.math.lgamma(x + 1.0)

    def mean(self, params: dict):
        base, extra = self._split(params)
        return self.mean_fn(*base, **extra)


_zinb = zero_inflated(negative_binomial_log_prob, negative_binomial_mean)
_zinb_lgamma_free, _ = zero_inflated(negative_binomial_rate_terms, None)
_zip = zero_inflated(poisson_log_prob, poisson_mean)

LIKELIHOODS = {
    "negative_binomial": Likelihood("negative_binomial", ("log_r", "logits"),
                                    negative_binomial_log_prob, negative_binomial_mean,
                                    lgamma_free_fn=negative_binomial_rate_terms),
    "poisson": Likelihood("poisson", ("log_rate",), poisson_log_prob, poisson_mean),
    "zero_inflated_negative_binomial": Likelihood(
        "zero_inflated_negative_binomial", ("log_r", "logits"), *_zinb, zero_inflated=True,
        lgamma_free_fn=_zinb_lgamma_free),
    "zero_inflated_poisson": Likelihood("zero_inflated_poisson", ("log_rate",), *_zip, zero_inflated=True),
}


def get_likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ValueError(f"Unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}.")
    return LIKELIHOODS[name]


# ----------------------------------------------------------------------------------- priors
PRIOR_LAWS = ("normal", "student-t")


def component_law(law: str, loc, scale, df=None):
    """Independent (over the latent dimension) Normal or Student-t components.

    The batch shape is loc.shape[:-1] (e.g. [K] or [K_1, ..., K_L]); the event shape is [D].
    """
    if law == "normal":
        base = tfd.Normal(loc=loc, scale=scale)
    elif law == "student-t":
        base = tfd.StudentT(df=df, loc=loc, scale=scale)
    else:
        raise ValueError(f"Unknown prior law {law!r}; choose one of {PRIOR_LAWS}.")
    return tfd.Independent(base, reinterpreted_batch_ndims=1)


def mixture_prior(logits, components):
    """The flat mixture p(z) = sum_k pi_k p(z|k) as a TFP MixtureSameFamily."""
    return tfd.MixtureSameFamily(tfd.Categorical(logits=logits), components)


def nested_mixture_prior(level_logits, components):
    """Mixture of mixtures over a component batch of shape [K_1, ..., K_L].

    level_logits[l] has shape [K_1, ..., K_l] and holds log p(y_l | y_<l) (unnormalised over the
    last axis). The innermost mixture mixes the leaves under every path prefix; each further
    MixtureSameFamily folds one level, so the result has batch shape [] and event shape [D].
    """
    dist = components
    for logits in reversed(level_logits):
        dist = tfd.MixtureSameFamily(tfd.Categorical(logits=logits), dist)
    return dist
