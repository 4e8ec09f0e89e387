"""Count likelihoods p(x|z) and latent priors p(z|y).

Likelihood log-densities are written out with lgamma so that they are cheap, XLA-friendly and
checked against scipy in the tests. Priors are TFP distributions rebuilt from Keras weights on
every call (a TFP object kept as an attribute would hold stale copies and lose gradients).
"""
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
    log_r = tf.clip_by_value(log_r, *LOG_R_RANGE)
    r = tf.exp(log_r)
    return (tf.math.lgamma(x + r) - tf.math.lgamma(r)
            + x * tf.math.log_sigmoid(logits) + r * tf.math.log_sigmoid(-logits))


def negative_binomial_rate_terms(x, params):
    """The NB terms that depend on p: x log p + r log(1 - p) (the rest, lgamma(x + r) - lgamma(r),
    is added separately when r is one per gene; see CountDecoder.log_prob)."""
    r = tf.exp(tf.clip_by_value(params["log_r"], *LOG_R_RANGE))
    logits = params["logits"]
    return x * tf.math.log_sigmoid(logits) + r * tf.math.log_sigmoid(-logits)


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
_zip = zero_inflated(poisson_log_prob, poisson_mean)

LIKELIHOODS = {
    "negative_binomial": Likelihood("negative_binomial", ("log_r", "logits"),
                                    negative_binomial_log_prob, negative_binomial_mean),
    "poisson": Likelihood("poisson", ("log_rate",), poisson_log_prob, poisson_mean),
    "zero_inflated_negative_binomial": Likelihood(
        "zero_inflated_negative_binomial", ("log_r", "logits"), *_zinb, zero_inflated=True),
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
