"""Differential expression of a trained model (`model.differential_expression`) against scanpy's
Wilcoxon test on log-normalised counts, on the same cells and genes, for every class of the
annotated hierarchy against its siblings; and on random halves of one population, where nothing
should be called (calibration).

    python analyses/differential/markers.py RUN DATA.h5ad NAME    # rows appended to markers.csv

Per comparison: genes called by each (model: is_de_fdr; scanpy: adjusted p < 0.05 and
|log2 fold change| > 0.25, the model's delta), their overlap (Jaccard), the Spearman correlation
of the two fold changes over the model's genes, and the overlap of the 20 genes each ranks highest
among those up in group 1. Groups are the annotated labels (the level columns), not the model's
clusters, so the comparison is of the tests, not of the clusterings.
"""
import argparse
import csv
import time
from pathlib import Path

import anndata
import numpy as np
import scanpy as sc
from scipy.stats import spearmanr

import scvae_hier as sh

HERE = Path(__file__).resolve().parent
DELTA = 0.25
TOP = 20


def scanpy_test(logged, first, second):
    """scanpy's Wilcoxon of first against second (boolean masks over logged's cells): a frame
    with log2 fold change and adjusted p-value per gene."""
    cells = logged[first | second].copy()
    cells.obs["group"] = np.where(first[first | second], "one", "two")
    sc.tl.rank_genes_groups(cells, "group", groups=["one"], reference="two", method="wilcoxon")
    result = sc.get.rank_genes_groups_df(cells, group="one").set_index("names")
    return result[["logfoldchanges", "pvals_adj"]]


def top_up(frame, called, lfc):
    """The TOP genes called and up in group 1 with the largest fold changes."""
    up = frame[called & (frame[lfc] > 0).to_numpy()].sort_values(lfc, ascending=False)
    return set(up.index[:TOP])


def groups_of(model, adata, column, group1, group2):
    """The model's own reading of the groups (as differential_expression makes them): boolean
    masks over adata's cells and the second group's name."""
    _, _, _, rows = model._cells_of(adata)
    first, second, name = model._groups(column, model._obs_values(adata, column, rows), group1, group2)
    masks = []
    for mask in (first, second):
        full = np.zeros(adata.n_obs, bool)
        full[rows] = mask
        masks.append(full)
    return masks[0], masks[1], name


def compare(model, adata, logged, column, group1, group2, first, second):
    """One comparison: both tests on the same cells; a dict of figures."""
    start = time.perf_counter()
    de = model.differential_expression(column, group1, group2=group2, adata=adata, delta=DELTA)
    seconds = time.perf_counter() - start
    wilcoxon = scanpy_test(logged, first, second).reindex(de.index)
    model_called = de["is_de_fdr"].to_numpy()
    scanpy_called = ((wilcoxon["pvals_adj"] < 0.05) & (wilcoxon["logfoldchanges"].abs() > DELTA)).to_numpy()
    both, either = (model_called & scanpy_called).sum(), (model_called | scanpy_called).sum()
    model_top = top_up(de, model_called, "lfc_mean")
    scanpy_top = top_up(wilcoxon, scanpy_called, "logfoldchanges")
    rho = spearmanr(de["lfc_mean"], wilcoxon["logfoldchanges"], nan_policy="omit").statistic
    return {"column": column, "group1": group1, "group2": de["group2"].iloc[0], "cells1": de.attrs["cells1"],
            "cells2": de.attrs["cells2"], "model_called": int(model_called.sum()),
            "scanpy_called": int(scanpy_called.sum()), "jaccard": round(float(both / either), 3) if either else 1.0,
            "spearman_lfc": round(float(rho), 3), f"top{TOP}_shared": len(model_top & scanpy_top),
            "model_top5": " ".join(sorted(model_top, key=lambda g: -de.loc[g, "lfc_mean"])[:5]),
            "scanpy_top5": " ".join(sorted(scanpy_top, key=lambda g: -wilcoxon.loc[g, "logfoldchanges"])[:5]),
            "seconds": round(seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("name")
    parser.add_argument("--out", default=str(HERE / "markers.csv"))
    args = parser.parse_args()
    adata = anndata.read_h5ad(args.data)
    model = sh.load(args.run, adata=adata)
    logged = adata.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    logged = logged[:, model.module.metadata["genes"]].copy()
    hierarchy = model.hierarchy
    comparisons = []
    for level in range(hierarchy.n_levels):
        for name in hierarchy.classes(level):
            comparisons.append((hierarchy.levels[level], name, None))
    # Calibration: random halves of each class of the first two levels, and of all cells.
    rng = np.random.default_rng(0)
    halves = []
    for level in range(min(2, hierarchy.n_levels)):
        for name in hierarchy.classes(level):
            halves.append((hierarchy.levels[level], name))
    halves.append((None, "all cells"))
    for column, name in halves:
        members = np.ones(adata.n_obs, bool) if column is None else (adata.obs[column] == name).to_numpy()
        label = np.full(adata.n_obs, None, dtype=object)
        label[members] = np.where(rng.random(members.sum()) < 0.5, "half A", "half B")
        key = f"halves of {name}"
        adata.obs[key] = label
        logged.obs[key] = label
        comparisons.append((key, "half A", "half B"))
    out = Path(args.out)
    fresh = not out.exists()
    with out.open("a", newline="") as handle:
        writer = None
        seen = set()
        for column, group1, group2 in comparisons:
            first, second, _ = groups_of(model, adata, column, group1, group2)
            key = (np.flatnonzero(first).tobytes(), np.flatnonzero(second).tobytes())
            if key in seen:                       # the same cells under another level's name
                continue
            seen.add(key)
            row = {"data": args.name, **compare(model, adata, logged, column, group1, group2, first, second)}
            print(row, flush=True)
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                if fresh:
                    writer.writeheader()
            writer.writerow(row)
            handle.flush()


if __name__ == "__main__":
    main()
