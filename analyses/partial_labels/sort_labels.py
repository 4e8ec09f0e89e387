"""Where level 1's errors are, with level-1 labels on 1% of the cells (issue 16, `l1_1pct`).

    python analyses/partial_labels/sort_labels.py ["runs/partial/l1_1pct_s*"] > analyses/partial_labels/sort_labels.txt

PBMC's level-1 labels are the sort gates (CD34+ or not). For every finished run of the setting,
each cell's label is checked against its 15 nearest neighbours in scanpy's log-normalised PCA (50
components) of the run's counts, a read-out that knows nothing of the model: a cell whose label most
of its neighbours do not share is "disputed". Printed per run, on the never-labelled cells: level-1
ARI; the disputed cells (and how many are from the CD34+ sort); how many of the run's errors they
are; the ARI without them; and the ARI of the neighbours' majority vote itself (every true label
known), what a read-out that follows expression gets on these labels.
"""
import glob
import os
import sys

import anndata
import numpy as np
import scanpy as sc
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors


def run_folders(pattern):
    found = [f for f in glob.glob(pattern) if os.path.exists(os.path.join(f, "outputs.h5ad"))]
    return sorted(found, key=lambda f: int(f.rsplit("_s", 1)[1]))


def disputed_labels(counts, is_stem, neighbours=15):
    """[n] bool: cells whose label most of their neighbours in a log-normalised PCA do not share,
    and [n] bool: the neighbours' majority vote."""
    cells = anndata.AnnData(counts.astype(float))
    sc.pp.normalize_total(cells, target_sum=1e4)
    sc.pp.log1p(cells)
    sc.pp.pca(cells, n_comps=50, random_state=0)
    index = NearestNeighbors(n_neighbors=neighbours + 1).fit(cells.obsm["X_pca"]).kneighbors(
        cells.obsm["X_pca"], return_distance=False)[:, 1:]
    vote = is_stem[index].mean(axis=1) > 0.5
    return vote != is_stem, vote


def main(pattern):
    rows = []
    for folder in run_folders(pattern):
        run = anndata.read_h5ad(os.path.join(folder, "outputs.h5ad"))
        stem = (run.obs["level_1"].astype(str) == "Stem").to_numpy()
        called = (run.obs["scvae_level_1"].astype(str) == "Stem").to_numpy()
        scored = ~run.obs["labelled"].to_numpy(bool)
        disputed, vote = disputed_labels(run.X, stem)
        errors = (called != stem) & scored
        kept = scored & ~disputed
        rows.append((adjusted_rand_score(stem[scored], called[scored]), adjusted_rand_score(stem[kept], called[kept]),
                     adjusted_rand_score(stem[scored], vote[scored])))
        print(f"{folder}: level-1 ARI {rows[-1][0]:.3f}; disputed cells {int((disputed & scored).sum())} "
              f"({int((disputed & scored & stem).sum())} of the CD34+ sort), {int((errors & disputed).sum())} of the "
              f"run's {int(errors.sum())} errors; ARI without them {rows[-1][1]:.3f}; "
              f"the neighbours' vote {rows[-1][2]:.3f}", flush=True)
    table = np.array(rows)
    print(f"{len(table)} runs, mean (sd): level-1 ARI {table[:, 0].mean():.3f} ({table[:, 0].std(ddof=1):.3f}); "
          f"without the disputed cells {table[:, 1].mean():.3f} ({table[:, 1].std(ddof=1):.3f}); "
          f"the neighbours' vote {table[:, 2].mean():.3f} ({table[:, 2].std(ddof=1):.3f})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/partial/l1_1pct_s*")
