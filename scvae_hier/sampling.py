"""Drawing counts from the model's generative process: p(z | a hierarchy node), then p(x | z).

The count laws are sampled with numpy from the decoder's parameters: the negative binomial as its
gamma-Poisson mixture (rate ~ Gamma(r, mean / r), x ~ Poisson(rate)), the zero-inflated laws with a
structural zero of probability sigmoid(dropout logits).
"""
import numpy as np

from .distributions import LOG_R_RANGE, LOG_RATE_RANGE


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def sample_counts(params: dict, rng: np.random.Generator) -> np.ndarray:
    """Counts [cells, genes] drawn from the count law with decoder parameters `params` (numpy)."""
    if "log_rate" in params:
        rate = np.exp(np.clip(params["log_rate"], *LOG_RATE_RANGE))
    else:
        log_r = np.clip(params["log_r"], *LOG_R_RANGE)
        r = np.exp(log_r)
        mean = np.exp(log_r + params["logits"])
        rate = rng.gamma(shape=r, scale=mean / r)
    counts = rng.poisson(rate)
    if "dropout_logits" in params:
        counts[rng.random(counts.shape) < _sigmoid(params["dropout_logits"])] = 0
    return counts
