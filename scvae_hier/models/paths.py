"""Algebra on hierarchy paths (y_1, ..., y_L) held as tensors of shape [B, K_1, ..., K_L].

Both MoMixVAE modes produce a joint log q(y_1..y_L | .) over every path; these helpers split
its KL to the prior chain into one conditional KL per level and read off per-level marginals.
"""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import numpy as np
import tensorflow as tf


def n_paths(sizes) -> int:
    return int(np.prod(sizes))


def chain(level_log_probs):
    """Joint log p(y_1..y_L) from conditionals: level_log_probs[l] has shape [..., K_1, ..., K_l]
    holding log p(y_l | y_<l), normalised over its last axis."""
    joint = level_log_probs[0]
    for conditional in level_log_probs[1:]:
        joint = tf.expand_dims(joint, -1) + conditional
    return joint


def _sum_out_below(log_joint, level, n_levels):
    """log q(y_1..y_level) from the joint (batch axis first), 0-based level."""
    axes = list(range(level + 2, n_levels + 1))
    return tf.reduce_logsumexp(log_joint, axis=axes) if axes else log_joint


def level_marginals(log_joint, n_levels):
    """log q(y_l | .) for every level: a list of [B, K_l] tensors."""
    marginals = []
    for level in range(n_levels):
        prefix = _sum_out_below(log_joint, level, n_levels)
        axes = list(range(1, level + 1))
        marginals.append(tf.reduce_logsumexp(prefix, axis=axes) if axes else prefix)
    return marginals


def level_kls(log_q, log_p, n_levels):
    """Chain-rule split of KL(q(path) || p(path)) into per-level terms
    E_q(y_<l) KL(q(y_l | y_<l) || p(y_l | y_<l)); they sum to the full KL. Both [B, K_1..K_L]
    (log_p may lack the batch axis)."""
    log_p = log_p + tf.zeros_like(log_q)
    kls = []
    for level in range(n_levels):
        q_prefix = _sum_out_below(log_q, level, n_levels)
        p_prefix = _sum_out_below(log_p, level, n_levels)
        q_conditional = q_prefix - tf.reduce_logsumexp(q_prefix, axis=-1, keepdims=True)
        p_conditional = p_prefix - tf.reduce_logsumexp(p_prefix, axis=-1, keepdims=True)
        weights = tf.exp(q_prefix)
        terms = weights * (q_conditional - p_conditional)
        kls.append(tf.reduce_sum(tf.reshape(terms, [tf.shape(terms)[0], -1]), axis=-1))
    return kls


def usage_kl(log_q_marginal, log_p_marginal):
    """KL(mean over the batch of q(y_l|x) || p(y_l)): large when the batch piles into few
    components (marginal collapse)."""
    q_bar = tf.reduce_mean(tf.exp(log_q_marginal), axis=0)
    return tf.reduce_sum(q_bar * (tf.math.log(q_bar + 1e-12) - log_p_marginal))


def perplexity(log_q_marginal):
    """exp(entropy) of the batch-mean q(y_l|x): the number of components in use."""
    q_bar = tf.reduce_mean(tf.exp(log_q_marginal), axis=0)
    return tf.exp(-tf.reduce_sum(q_bar * tf.math.log(q_bar + 1e-12)))
