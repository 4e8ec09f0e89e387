"""Novelty: how much worse the model explains a cell than the cells it was trained on, to flag
types a reference lacked.

TreeVAE's posterior q(c|x) = softmax_c(log p(c) - KL(q(z|x) || p(z|c))) only compares components:
a cell of a type the reference never had still goes to the least bad one, often with probability
near 1, so thresholding the posterior does not find it (PBMC's CD14+ monocytes left out of a
reference: ROC AUC 0.28-0.41 for 1 - max q(c|x), README). What does find it is how well the whole
model explains the cell: its ELBO at the latent mean, per count of the cell (so deep and shallow
cells compare). A cell's *novelty* is the share of the training cells of its most probable
component that the model explains better, so it reads alike for every component, tight or broad:
about uniform on cells like the training cells, 1.0 beyond them all. The model records each
component's quantiles once trained (`metadata["novelty_reference"]`), so a saved model scores new
files without the training data. It sees a type only through the model's genes: a type whose
marker genes are not among them looks like the cells it resembles there. And the ELBO per count
grows with a cell's depth: cells deeper than the training cells would read as typical (a left-out
type in a query of 2.0 times the training depth: 15% above 0.99 instead of 95%). So cells whose
median counts exceed the training cells' are scored with their counts binomially thinned by the
ratio of the two medians (`thinned`, as scanpy's downsample_counts), which brings their depths
onto the training cells' (87% then). Thinning every cell to at most the training median instead
read the thinned cells as typical (14%). A much shallower query cannot be thickened, and
`depth_warning` says so.
"""
import numpy as np

QUANTILES = np.linspace(0.0, 1.0, 201)  # the recorded quantiles of each component's scores
MIN_CELLS = 20  # a component with fewer training cells is read against all training cells
DEPTH_RATIO = 1.5  # cells this much shallower than the training cells (median counts): a warning


class NoveltyDepthWarning(UserWarning):
    """Cells much shallower than the training cells: their novelty reads high."""


def gives_scores(model) -> bool:
    """Whether the model gives each cell its ELBO per count and most probable component (TreeVAE)."""
    return getattr(model, "gives_elbo_per_count", False)


def novelty_reference(elbo_per_count, components, n_components, counts) -> dict:
    """The quantiles (QUANTILES) of the training cells' negative ELBO per count, per component, and
    their median counts (for `thinning_factor` and `depth_warning`)."""
    misfit, components = -np.asarray(elbo_per_count, dtype=float), np.asarray(components)
    pooled = np.quantile(misfit, QUANTILES)
    per_component = [np.quantile(misfit[components == k], QUANTILES) if (components == k).sum() >= MIN_CELLS
                     else pooled for k in range(n_components)]
    return {"quantiles": [[float(f"{v:.6g}") for v in q] for q in per_component], "n_cells": int(len(misfit)),
            "median_counts": float(np.median(counts))}


def thinning_factor(counts, reference) -> float:
    """The share of counts to keep so that these cells' median counts are the training cells' (1:
    keep all, for cells no deeper than them and for a reference without their depth)."""
    trained, here = reference.get("median_counts"), float(np.median(counts))
    return min(1.0, trained / here) if trained and here else 1.0


def thinned(X, factor, seed=0):
    """Counts binomially thinned to `factor` of their reads (seeded); a cell left with no count keeps its own."""
    import scipy.sparse as sp

    original = sp.csr_matrix(X, dtype=np.float32)
    X = original.copy()
    X.data = np.random.default_rng(seed).binomial(X.data.astype(np.int64), factor).astype(np.float32)
    empty = np.flatnonzero(np.asarray(X.sum(axis=1)).ravel() == 0)
    if len(empty):
        X = X.tolil()
        X[empty] = original[empty]
        X = X.tocsr()
    X.eliminate_zeros()
    return X


def depth_warning(counts, reference):
    """A warning (text) when these cells' median counts are more than DEPTH_RATIO times shallower
    than the training cells', else None."""
    trained, here = reference.get("median_counts"), float(np.median(counts))
    if not trained or not here or trained / here <= DEPTH_RATIO:
        return None
    return (f"These cells have {here / trained:.2f} times the training cells' median counts on the model's genes "
            f"({here:.0f} against {trained:.0f}). Novelty is read against the training cells, and the ELBO per count "
            f"is lower for shallower cells, so they read as more novel: known types may pass a cutoff. Rank cells by "
            f"novelty within this data rather than trusting a fixed novelty_cutoff.")


def novelty(elbo_per_count, components, reference) -> np.ndarray:
    """Each cell's share of its component's training cells that the model explains better, in [0, 1]."""
    table = np.asarray(reference["quantiles"], dtype=float)
    misfit, components = -np.asarray(elbo_per_count, dtype=float), np.asarray(components, dtype=int)
    out = np.empty(len(misfit))
    for k in np.unique(components):
        rows = components == k
        out[rows] = np.interp(misfit[rows], table[k], QUANTILES)  # 0 below the least, 1 beyond the largest
    return out


def record_novelty_reference(model, training_outputs) -> None:
    """Store the training cells' quantiles in model.metadata (for models whose outputs give the scores)."""
    if training_outputs is not None and "elbo_per_count" in training_outputs:
        model.metadata["novelty_reference"] = novelty_reference(
            training_outputs["elbo_per_count"], training_outputs["component"], model.n_components,
            training_outputs["counts"])
