"""The Kang cells as the original scVAE (2.1.4) reads them: a loom of the raw counts of the 500 genes
that issue 12's Kang experiment (`analyses/kang.yaml`) prepares, every cell, CellID = our obs_names,
ClusterName = level 4. Two steps, since loompy lives in the scVAE venv (Python 3.7):

    python analyses/scvae_kang/build_loom.py OUT.npz                   # this package's venv
    V/bin/python analyses/scvae_kang/build_loom.py OUT.npz OUT.loom   # V: the scVAE venv; its loompy writes it
"""
import json
import sys

import numpy as np


def export(npz):
    import yaml
    from score import experiment_cells   # the Kang experiment's cells and genes, as score.py scores them

    cells, _, _ = experiment_cells(yaml.safe_load(open("analyses/kang.yaml")))
    prepared = cells.adata
    np.savez_compressed(npz, counts=prepared.X.toarray().T.astype(np.float32))
    json.dump({"genes": list(prepared.var_names), "cells": list(prepared.obs_names),
               "labels": list(prepared.obs["level_4"].astype(str))}, open(npz + ".json", "w"))
    print(f"{prepared.n_obs} cells x {prepared.n_vars} genes -> {npz}")


def write_loom(npz, loom):
    import loompy
    meta = json.load(open(npz + ".json"))
    counts = np.load(npz)["counts"]
    loompy.create(loom, counts, {"Gene": np.array(meta["genes"])},
                  {"CellID": np.array(meta["cells"]), "ClusterName": np.array(meta["labels"])})
    print(f"{loom}: {counts.shape[0]} genes x {counts.shape[1]} cells")


if __name__ == "__main__":
    export(sys.argv[1]) if len(sys.argv) == 2 else write_loom(sys.argv[1], sys.argv[2])
