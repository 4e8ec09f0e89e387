"""scVI + Leiden, the peer a user would most likely pick instead, on the issue-12 experiment's folds.

    .venv/bin/python analyses/scvi_peer/export_folds.py analyses/tree.yaml analyses/kang.yaml   # once
    OMP_NUM_THREADS=1 /work/scvi_venv/bin/python analyses/scvi_peer/scvi_leiden.py pbmc data/pbmc.h5ad
    OMP_NUM_THREADS=1 /work/scvi_venv/bin/python analyses/scvi_peer/scvi_leiden.py kang2018 data/kang2018.h5ad

Runs with the python of a separate virtual environment with scvi-tools 1.4.2 (never a dependency of
scvae-hier); from this package it imports only TensorFlow-free modules (the hierarchy, the metrics
and the Leiden bisection the experiment's other peers use).

Per fold, exactly as the experiment's TreeVAE runs: the same cells, the same 500 genes (raw counts),
the same batch covariate; scVI with scvi-tools' defaults (its own epoch count for the cell number,
n_latent 10, ZINB) trained on the fold's training and validation cells, as our runs see them; then
on the fold's TEST cells only, the latent means, a 15-neighbour graph and Leiden bisected to each
level's class count K_l (`scvae_hier.analysis.peers.leiden_table`, the same code as the
experiment's "Leiden on TreeVAE's latent" and "scanpy PCA + Leiden" rows), scored per level
against the annotated hierarchy. As a check of the pipeline, scanpy's PCA + Leiden on the same
test cells is scored here too and must reproduce the experiment's scanpy row.
Rows are appended to results.csv as each fold finishes; a rerun skips what is there.
"""
import json
import os
import sys
import time
from pathlib import Path

for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(name, "1")

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from scvae_hier.analysis.peers import leiden_table, scanpy_representation  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402

RESULTS = HERE / "results.csv"
SCVI_GROUP, SCANPY_CHECK = "scVI + Leiden at K_l", "scanpy PCA + Leiden at K_l (check)"


def done():
    if not RESULTS.is_file():
        return set()
    table = pd.read_csv(RESULTS)
    return set(zip(table.data, table.fold, table.group))


def append(table):
    table.to_csv(RESULTS, mode="a", header=not RESULTS.is_file(), index=False)


def scvi_latent(train, test, seed):
    import scvi
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(train, batch_key="batch")
    model = scvi.model.SCVI(train)
    start = time.time()
    model.train(accelerator="cpu", enable_progress_bar=False)
    seconds = time.time() - start
    return model.get_latent_representation(test), seconds, model.history["elbo_train"].shape[0]


def fold_cells(name, data):
    """(the exported table of cells: label, batch, split per fold; the experiment's cells x genes
    of `data` as an AnnData with obs["batch"]), from `export_folds.py`'s folder for `name`."""
    folder = HERE / "folds" / name
    cells = pd.read_csv(folder / "cells.csv", index_col="cell")
    genes = (folder / "genes.txt").read_text().split()
    adata = anndata.read_h5ad(data)[cells.index, genes].copy()
    adata.obs["batch"] = pd.Categorical(cells["batch"])
    return cells, adata


def run(name, data, folds, seed=0):
    cells, adata = fold_cells(name, data)
    hierarchy = Hierarchy.from_dict(json.loads((HERE / "folds" / name / "hierarchy.json").read_text()))
    for fold in folds:
        finished = done()   # read per fold: two processes may share the folds
        split = cells[f"fold_{fold}"].to_numpy()
        test = adata[split == "test"].copy()
        labels = cells.loc[test.obs_names, "label"].to_numpy()
        if (name, fold, SCANPY_CHECK) not in finished:
            counts = test.X.toarray() if hasattr(test.X, "toarray") else np.asarray(test.X)
            table = leiden_table(hierarchy, labels, scanpy_representation(counts, seed=seed), seed=seed)
            append(table.reset_index().assign(data=name, fold=fold, group=SCANPY_CHECK, train_seconds=np.nan, epochs=0))
        if (name, fold, SCVI_GROUP) not in finished:
            latent, seconds, epochs = scvi_latent(adata[split != "test"].copy(), test, seed)
            table = leiden_table(hierarchy, labels, latent, seed=seed)
            append(table.reset_index().assign(data=name, fold=fold, group=SCVI_GROUP, train_seconds=seconds,
                                              epochs=epochs))
            print(f"{name} fold {fold}: scVI {epochs} epochs in {seconds:.0f} s; ARI",
                  " / ".join(f"{v:.3f}" for v in table["ari"]), flush=True)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], [int(f) for f in sys.argv[3:]] or range(5))
