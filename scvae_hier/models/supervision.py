"""Partial labels on a model's discrete posterior: which components a cell's labels allow, the
posterior restricted to them, and the named predictions that form a path of the hierarchy.

Labels are codes [B, L] (the class index at each level, -1 unlabelled; coarse levels completed
from fine ones by `labels.complete`). Every component of a model's posterior (a leaf of TreeVAE,
a cluster of MixtureVAE, a class of one branch of IndMoMVAE, a path of MoMixVAE) has a class at
the levels it spans (`ancestors` [L', M], a value no label takes where it has none), and a
labelled cell may use only the components whose class at each labelled level is its label.

Semi-supervised objective (Kingma et al. 2014's M2; scANVI's choice): the ELBO with q restricted
to the allowed components, renormalised (the bound on log p(x, labels), summed over the paths
that agree with the labels), plus `classification_weight` x -log q(allowed | x) from the
unrestricted posterior, which teaches the encoder where each class lies so that it also helps the
cells nobody labelled.
"""
from .. import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import numpy as np
import tensorflow as tf

from ..labels import allowed_components
from ..tree_shape import class_ancestors, leaf_ancestors

NEGLIGIBLE = -1e9   # log-mask of components a cell's labels exclude


def label_log_mask(labels, ancestors):
    """[B, M] log-mask, 0 on the components the labels allow and NEGLIGIBLE elsewhere.

    labels [B, L'] codes of the levels `ancestors` [L', M] covers (the first L' levels)."""
    labels = tf.cast(labels, tf.int32)[:, :, None]                                   # [B, L', 1]
    ancestors = tf.constant(np.asarray(ancestors), tf.int32)[None]                    # [1, L', M]
    ok = tf.reduce_all((labels < 0) | tf.equal(ancestors, labels), axis=1)
    return tf.where(ok, 0.0, NEGLIGIBLE)


def restrict(log_q, log_mask):
    """(log q restricted to the allowed components and renormalised, -log q(allowed)), for
    log_q [B, M] and a log-mask of the same shape. An unlabelled cell gets (log_q, 0)."""
    log_in = tf.reduce_logsumexp(log_q + log_mask, axis=-1)
    return log_q + log_mask - log_in[:, None], -log_in


def path_predictions(level_probabilities, parents, labels=None):
    """The nested prediction rule of a mixture over leaves (TreeVAE, semi-supervised MixtureVAE):
    every level's class is an ancestor of the most probable leaf, among the leaves the labels
    ([n, L] codes, -1 unlabelled) allow. level_probabilities: [n, K_l] per level (only the last,
    the leaf marginals, is read); returns [n] class indices per level, a path for every cell."""
    leaf = np.asarray(level_probabilities[-1], dtype=float)
    ancestors = leaf_ancestors(parents, leaf.shape[1])
    if labels is not None:
        leaf = np.where(allowed_components(labels, ancestors), leaf, -1.0)
    return [row[leaf.argmax(axis=1)] for row in ancestors]


def level_masks(labels, parents, level_sizes):
    """Per level, the [B, K_l] log-mask of its classes: a class is allowed when it is the label of
    its level (if any) and under the labels of every coarser level (a coarse label restricts the
    finer levels to its subtree)."""
    return [label_log_mask(labels[:, :level + 1], ancestors)
            for level, ancestors in enumerate(class_ancestors(parents, level_sizes))]


def most_probable_path(level_probabilities, parents, labels=None):
    """The tree path (leaf and its ancestors) with the largest sum over levels of log q(y_l|x),
    among the paths the labels allow: the nested prediction of models whose levels have their own
    posteriors (IndMoMVAE's branches, MoMixVAE's marginals). level_probabilities: [n, K_l] per level."""
    probabilities = [np.asarray(p, dtype=float) for p in level_probabilities]
    ancestors = leaf_ancestors(parents, probabilities[-1].shape[1])                      # [L, K_L]
    score = sum(np.log(np.maximum(p[:, row], 1e-300)) for p, row in zip(probabilities, ancestors))
    if labels is not None:
        score = np.where(allowed_components(labels, ancestors), score, -np.inf)
    leaf = score.argmax(axis=1)
    return [row[leaf] for row in ancestors]


def hierarchy_parents(hierarchy):
    """parents[l - 1]: the parent index of every class of level l, from a Hierarchy."""
    return [hierarchy.parent_index(level).tolist() for level in range(1, hierarchy.n_levels)]


def supervision_arguments(options, hierarchy) -> dict:
    """The constructor arguments of a model trained on partial labels ({} without them)."""
    if not getattr(options, "semi_supervised", False):
        return {}
    if hierarchy is None:
        raise ValueError("Partial labels need a hierarchy (--hierarchy or --levels).")
    return dict(parents=hierarchy_parents(hierarchy), semi_supervised=True, label_weight=float(options.label_weight))


def component_level_masks(component_ancestors, level_sizes):
    """Per level, the [M, K_l] log-mask that sums components into the classes above them."""
    return [np.where(row[:, None] == np.arange(k), 0.0, NEGLIGIBLE).astype("float32")
            for row, k in zip(np.asarray(component_ancestors), level_sizes)]


def class_log_marginals(log_q, masks):
    """log q(y_l|x) [B, K_l] per level from component log-posteriors log_q [B, M] (their sum)."""
    return [tf.reduce_logsumexp(log_q[:, :, None] + mask, axis=1) for mask in masks]
