"""Calibrated class probabilities: temperature scaling of the leaf posterior of a semi-supervised
TreeVAE or MixtureVAE (the models whose coarse classes are sums of their leaves).

q(leaf | x) compares the prior's components at the cell's latent, and is surer than its calls
are right: on label transfer's query cells the level-4 calls' mean probability was 0.97 where
0.86 of them were right (`analyses/partial_labels/calibration.py`). Temperature scaling (Guo et al.
2017) fits one number T on labelled cells the model did not train on (its validation cells), by
the likelihood of their labels, and reads q_T(leaf | x) proportional to q(leaf | x)^(1/T). Coarse
classes still sum their leaves, so the levels nest; no call changes (the leaves keep their order,
and every call is a leaf and its ancestors), nor the latent: only how sure the probabilities say
the calls are, and so which cells `unassigned_below` leaves unnamed.
"""
import numpy as np

from .tree_shape import leaf_ancestors

MIN_LABELLED = 30   # labelled validation cells needed to fit T (fewer: the posterior is left as it is)
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(20.0), 401))  # searched: 1.1% steps


def tempered(leaf_probabilities, temperature) -> np.ndarray:
    """q(leaf | x)^(1/T), renormalised per cell; [n, K_L]."""
    logits = np.log(np.clip(np.asarray(leaf_probabilities, dtype=np.float64), 1e-300, None)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def level_probabilities(leaf_probabilities, ancestors) -> list:
    """[n, K_l] per level: each class the sum of the leaves under it. ancestors: [L, K_L], the class
    of every leaf at every level (`tree_shape.leaf_ancestors`)."""
    ancestors = np.asarray(ancestors)
    out = []
    for row in ancestors:
        summed = np.zeros((leaf_probabilities.shape[0], int(row.max()) + 1))
        np.add.at(summed.T, row, leaf_probabilities.T)
        out.append(summed)
    return out


def fit_temperature(leaf_probabilities, ancestors, labels):
    """T maximising the likelihood of each labelled cell's deepest label (the summed probability of
    the leaves under it), over TEMPERATURES; None with fewer than MIN_LABELLED labelled cells.
    labels: [n, L] class codes per level, -1 where a cell is unlabelled."""
    labels = np.asarray(labels)
    labelled = (labels >= 0).any(axis=1)
    if labelled.sum() < MIN_LABELLED:
        return None
    labels, p = labels[labelled], np.asarray(leaf_probabilities, dtype=np.float64)[labelled]
    deepest = (labels >= 0).sum(axis=1) - 1                       # labels are completed upwards
    ancestors = np.asarray(ancestors)
    wanted = labels[np.arange(len(labels)), deepest]
    under = ancestors[deepest] == wanted[:, None]                 # [cells, leaves]: leaves under the label
    losses = [-np.log(np.clip((tempered(p, t) * under).sum(axis=1), 1e-300, None)).mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def applies(model) -> bool:
    """Models whose levels are sums of leaf posteriors and that learned named classes from labels:
    TreeVAE and MixtureVAE with labels. IndMoMVAE's branches and MoMixVAE's marginals are
    posteriors of their own per level, which one leaf temperature would not keep nested."""
    return type(model).__name__ in ("TreeVAE", "MixtureVAE") and bool(getattr(model, "semi_supervised", False))


def ancestors_of(model) -> np.ndarray:
    """[L, K_L] the class of every leaf at every level; a MixtureVAE's leaves are its components,
    the extra (unnamed) ones under its `unassigned` classes (`tree_parents`)."""
    return leaf_ancestors(getattr(model, "tree_parents", None) or model.parents, model.level_sizes[-1])


def leaf_key(model) -> str:
    """The outputs' key of the finest level's (the leaves') posterior."""
    return f"level_{len(model.level_sizes)}_probabilities"


def fit_model_temperature(model, validation_outputs, validation_labels) -> None:
    """Store in model.metadata (saved with it) the temperature fitted on uncalibrated outputs of
    labelled cells it did not train on; none where fewer than MIN_LABELLED are labelled."""
    temperature = fit_temperature(validation_outputs[leaf_key(model)], ancestors_of(model), validation_labels)
    if temperature is not None:
        model.metadata["temperature"] = temperature


def calibrate(model, outputs: dict) -> dict:
    """The outputs with the level probabilities read at the model's temperature (if it has one)."""
    temperature = getattr(model, "metadata", {}).get("temperature")
    if temperature is None or not applies(model):
        return outputs
    levels = level_probabilities(tempered(outputs[leaf_key(model)], temperature), ancestors_of(model))
    return {**outputs, **{f"level_{i + 1}_probabilities": p.astype(np.float32) for i, p in enumerate(levels)}}
