"""Held-out evaluation of a trained model: the ELBO with its terms, and the importance-weighted
bound (IWAE), which is tighter and approaches log p(x) as the number of samples grows."""
from . import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import numpy as np
import tensorflow as tf

from .data import CountBatches

CELLS_TIMES_SAMPLES = 8192  # per model call: bounds memory whatever n_samples is


def iwae(model, X, n_samples=100, batch_size=256, seed=0, progress=None, covariates=None) -> np.ndarray:
    """Per-cell IWAE bound log (1/S) sum_s w_s, [n_cells], from `model.log_importance_weights`.

    The S samples run in chunks; each chunk's log-sum-exp is accumulated with logaddexp, so the
    result equals one log-mean-exp over all S samples. Draws are stateless, keyed by
    (seed, call index): the same arguments give the same numbers, and training noise is untouched.
    `progress` is called with (batches done, batches in all); `covariates` are the cells' one-hot
    batch covariates for a model trained with them."""
    batches = CountBatches(X, batch_size=batch_size, covariates=covariates)
    chunk = max(1, min(int(n_samples), CELLS_TIMES_SAMPLES // batches.batch_size))
    starts = range(0, int(n_samples), chunk)
    out, call = [], 0
    for index in range(len(batches)):
        x, c = _batch(batches[index])
        total = np.full(x.shape[0], -np.inf)
        for start in starts:
            size = min(chunk, int(n_samples) - start)
            log_w = model.log_importance_weights(x, size, seed=tf.constant([seed, call], tf.int64), covariates=c)
            total = np.logaddexp(total, tf.reduce_logsumexp(log_w, axis=0).numpy().astype(np.float64))
            call += 1
        out.append(total - np.log(n_samples))
        if progress is not None:
            progress(index + 1, len(batches))
    return np.concatenate(out)


def _batch(item):
    """(counts, covariates or None) as tensors from a CountBatches item."""
    covariates = item.get("covariates")
    return tf.constant(item["counts"]), None if covariates is None else tf.constant(covariates)


def elbo_terms(model, X, batch_size=256, covariates=None) -> dict:
    """Every term of `model.terms` per cell, with the KL weight at 1 (the true bound, whatever the
    warm-up left it at) and the noise counter restored afterwards, so evaluating does not shift a
    resumed run's noise. Batch-level terms (components used, marginal usage) hold their batch's
    value for each cell of that batch; cells are batched in a fixed random order, since files
    usually store cells grouped by type and a one-type batch would show one component in use."""
    order = np.random.default_rng(0).permutation(X.shape[0])
    batches = CountBatches(X[order], batch_size=batch_size, covariates=None if covariates is None else
                           np.asarray(covariates)[order])
    kl_weight, noise_draws = model.kl_weight.numpy(), model.noise_draws.numpy()
    model.kl_weight.assign(1.0)
    parts = {}
    try:
        for index in range(len(batches)):
            x, c = _batch(batches[index])
            for name, value in model.terms(x, training=False, covariates=c).items():
                value = np.broadcast_to(value.numpy(), (x.shape[0],))
                parts.setdefault(name, []).append(value)
    finally:
        model.kl_weight.assign(kl_weight)
        model.noise_draws.assign(noise_draws)
    inverse = np.argsort(order)
    return {name: np.concatenate(values)[inverse] for name, values in parts.items()}


def check_genes(model_genes, data_genes) -> None:
    """Raise a ValueError unless a data file has exactly the model's genes in the model's order:
    a model reads genes by column, so any other file would be scored on the wrong genes."""
    model_genes, data_genes = [str(g) for g in model_genes], [str(g) for g in data_genes]
    if model_genes == data_genes:
        return

    def names(genes):
        shown = ", ".join(genes[:10])
        return shown + (f" and {len(genes) - 10} more" if len(genes) > 10 else "")

    model_set, data_set = set(model_genes), set(data_genes)
    missing = [g for g in model_genes if g not in data_set]
    extra = [g for g in data_genes if g not in model_set]
    problems = []
    if missing:
        problems.append(f"{len(missing)} gene(s) of the model missing from the data: {names(missing)}")
    if extra:
        problems.append(f"{len(extra)} gene(s) in the data unknown to the model: {names(extra)}")
    if not problems:
        problems.append("the same genes in a different order (or with duplicates); reorder the data's genes "
                        "to the model's order")
    raise ValueError(f"The data's genes do not match the model's ({len(model_genes)} genes): "
                     + "; ".join(problems) + ".")
