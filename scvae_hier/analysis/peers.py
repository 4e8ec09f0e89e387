"""What a user would do instead of our models, scored like them: Leiden bisected to each level's
class count K_l (`leiden.leiden_at_k`) on scanpy's standard representation of the counts, or on
a model's own latent. Both run on the evaluated cells alone, so they are scored on exactly the
cells (and folds) the models are.
"""
import numpy as np
import pandas as pd

from ..metrics import level_scores, nesting
from .leiden import ONE_THREAD, leiden_levels

SCANPY_GROUP = "scanpy PCA + Leiden"


def scanpy_representation(counts, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """scanpy's standard pipeline on raw counts (the genes given, i.e. the models' HVGs):
    normalize_total (10,000 per cell), log1p, scale (clipped at 10), PCA with `n_pcs` components.
    On one BLAS thread, so the figures do not depend on the machine (`leiden.ONE_THREAD`)."""
    import anndata
    import scanpy as sc

    with ONE_THREAD():
        adata = anndata.AnnData(counts.astype(np.float32))
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.scale(adata, max_value=10)
        sc.pp.pca(adata, n_comps=min(n_pcs, adata.n_obs - 1, adata.n_vars - 1), random_state=seed)
    return adata.obsm["X_pca"]


def leiden_table(hierarchy, labels, representation, seed: int = 0, max_cells: int = None) -> pd.DataFrame:
    """Per-level scores (scvae_hier.metrics.level_scores) of Leiden at K_l on `representation`,
    plus each level's `nesting` (majority parent), the resolution it took and the cells scored:
    a seeded sample of `max_cells` of them when there are more (the bisection runs Leiden some
    tens of times per level, minutes on 100,000 cells)."""
    labels, representation = np.asarray(labels), np.asarray(representation)
    if max_cells is not None and labels.size > max_cells:
        chosen = np.sort(np.random.default_rng(seed).choice(labels.size, max_cells, replace=False))
        labels, representation = labels[chosen], representation[chosen]
    fits = leiden_levels(representation, hierarchy.sizes, seed=seed)
    predictions = [fit.labels for fit in fits]
    table = level_scores(hierarchy, labels, predictions)
    table["nesting"] = nesting(predictions)
    table["resolution"] = [fit.resolution for fit in fits]
    table["hierarchy_consistency"] = table.attrs["hierarchy_consistency"]
    table["n_cells"] = labels.size
    return table


def _rows(table, group, run, n_cells) -> pd.DataFrame:
    rows = table.reset_index()
    rows.insert(0, "run", str(run))
    rows.insert(0, "group", group)
    rows["iwae"] = rows["elbo"] = np.nan      # not generative models: no bound
    if "n_cells" not in rows:   # tables written before leiden_table recorded the cells it scored
        rows["n_cells"] = n_cells
    return rows


def peer_rows(runs, groups, subset="test", seed=0) -> pd.DataFrame:
    """Rows (as compare.run_rows) of the peers on each evaluated run's cells: Leiden at K_l on the
    run's own latent (group "Leiden on <group>'s latent", from its evaluation's latent_leiden.csv),
    and scanpy's pipeline + Leiden, once per distinct set of cells (runs of several models on
    one fold share it). `groups` maps each run to its group name."""
    from ..hierarchy import Hierarchy
    from ..runs import RunDirectory
    from .compare import evaluated_cells

    frames, seen = [], set()
    for run in runs:
        directory = RunDirectory(run)
        latent = pd.read_csv(directory.evaluation(subset) / "latent_leiden.csv", index_col="level")
        cells = evaluated_cells(run, subset)
        frames.append(_rows(latent, f"Leiden on {groups[str(run)]}'s latent", f"{run} (Leiden on its latent)",
                            cells.n_obs))
        if frozenset(cells.obs_names) in seen:
            continue
        seen.add(frozenset(cells.obs_names))
        hierarchy = Hierarchy.from_dict(directory.read_config()["hierarchy"])
        labels = cells.obs[hierarchy.label_column].astype(str).to_numpy()
        hierarchy = hierarchy.restrict(labels)
        counts = cells.X.toarray() if hasattr(cells.X, "toarray") else np.asarray(cells.X)
        table = leiden_table(hierarchy, labels, scanpy_representation(counts, seed=seed), seed=seed)
        frames.append(_rows(table, SCANPY_GROUP, f"{SCANPY_GROUP} (cells of {run})", cells.n_obs))
    return pd.concat(frames, ignore_index=True)
