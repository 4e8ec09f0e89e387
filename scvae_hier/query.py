"""Query batches the reference never saw: give them covariate columns and fit only those.

A model trained with a batch covariate sees each cell's batch as one-hot columns appended to the
encoder's input and to the decoder's latent input. For a query from new batches (new donors, a new
study) `extend_batches` appends one column per new batch, copying every trained weight, and
`fit_new_batches` fits only the kernel rows of the new columns on the query cells, by the query's
ELBO, with everything else frozen (batch normalisation statistics included). This is scArches'
architecture surgery (Lotfollahi et al. 2022): the reference's latent space, prior components and
cluster names stay exactly as trained, so the query is named by the reference's classes, and the
new rows absorb what differs between the query's batches and the reference's.

A new batch's rows start at the mean of the training batches' rows (an average training batch),
so before fitting the extended model reads the query as `batch=` would with an averaged batch.
"""
from . import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import keras
import numpy as np
import tensorflow as tf

from .data import CountBatches


def unseen_batches(module, values) -> list:
    """The batch names among `values` that the model has no covariate column for, sorted."""
    return sorted(set(map(str, values)) - set(module.covariates))


def extend_batches(module, batches, cells_per_batch=None):
    """A copy of the trained `module` with covariate columns for `batches` appended.

    Returns (extended model, [(variable, row mask)] for every kernel that gained rows): the mask
    is 1 on the new batches' rows, the only weights `fit_new_batches` changes. On cells of the
    training batches the extended model gives exactly the original's outputs."""
    batches = [str(b) for b in batches]
    if not module.n_covariates:
        raise ValueError("This model was trained without a batch covariate, so it has no batch columns to extend; "
                         "annotate the query as it is, or train the reference with --batch-key to fit new batches.")
    known = sorted(set(batches) & set(module.covariates))
    if known or not batches:
        raise ValueError(f"Batches to add must be new and at least one; {known or 'none'} given "
                         f"(the model knows {list(module.covariates)}).")
    config = module.get_config()
    config["covariates"] = [*module.covariates, *batches]
    metadata = dict(module.metadata)
    counts = dict(metadata.get("batch_counts", {}))
    for batch in batches:
        counts[batch] = int((cells_per_batch or {}).get(batch, 0))
    metadata["batch_counts"] = counts
    metadata["query_batches"] = [*metadata.get("query_batches", []), *batches]
    config["metadata"] = metadata
    extended = type(module).from_config(config)
    extended.build()
    if len(extended.weights) != len(module.weights):
        raise RuntimeError(f"The extended {type(module).__name__} has {len(extended.weights)} weights, the trained "
                           f"one {len(module.weights)}; cannot copy one into the other.")
    grown, n_old, n_new = [], module.n_covariates, len(batches)
    for old, new in zip(module.weights, extended.weights):
        value = keras.ops.convert_to_numpy(old)
        if tuple(old.shape) == tuple(new.shape):
            new.assign(value)
            continue
        if tuple(old.shape[1:]) != tuple(new.shape[1:]) or new.shape[0] - old.shape[0] != n_new:
            raise RuntimeError(f"Weight {old.path} changes shape {tuple(old.shape)} -> {tuple(new.shape)}, which "
                               f"is not {n_new} more covariate rows.")
        rows = old.shape[0]
        start = value[rows - n_old:].mean(axis=0)          # the covariate rows are the input's last ones
        new.assign(np.concatenate([value, np.repeat(start[None], n_new, axis=0)]).astype(value.dtype))
        mask = np.zeros(new.shape, dtype=np.float32)
        mask[rows:] = 1.0
        grown.append((new, mask))
    if not grown:
        raise RuntimeError(f"No weight of the {type(module).__name__} takes the batch covariate; nothing to fit.")
    return extended, grown


def fit_new_batches(extended, grown, X, covariates, epochs=50, batch_size=128, learning_rate=1e-3, seed=0,
                    log=None) -> list:
    """Fit the new batches' rows (`grown`, from extend_batches) on query counts X [cells, genes]
    with their one-hot `covariates` over the extended model's batches: Adam on -ELBO, a fixed
    number of epochs (the query has no held-out cells to stop on). Returns the mean loss per epoch."""
    variables = [variable for variable, _ in grown]
    masks = [tf.constant(mask) for _, mask in grown]
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(variables)
    batches = CountBatches(X, batch_size, shuffle=True, seed=seed, covariates=covariates)

    # No tensor-dependent Python in the ELBO, so no AutoGraph: once in a full test run (2026-12-04) its
    # converted-call cache handed `terms` the converted `level_log_marginals` here (not reproduced alone).
    @tf.function(autograph=False)
    def step(x, c):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(extended.terms(x, training=False, covariates=c)["loss"])
        gradients = tape.gradient(loss, variables)
        optimizer.apply([g * m for g, m in zip(gradients, masks)], variables)
        return loss

    history = []
    for epoch in range(int(epochs)):
        batches.epoch = epoch
        losses = [float(step(tf.constant(b["counts"]), tf.constant(b["covariates"], tf.float32)))
                  for b in (batches[i] for i in range(len(batches)))]
        history.append(float(np.mean(losses)))
        if log is not None:
            log(f"query epoch {epoch + 1}/{epochs}: loss {history[-1]:.2f}")
    batches.release()
    return history
