"""The guard against fragments below the top level (`tree.MIN_CLASS_SHARE`, 2026-12-04), measured
on trained runs: each run's final refit is redone without it (MIN_CLASS_SHARE = 0, the rule before)
into RUN_noguard, on the same trained encoder, and the ARI of both runs' own clusters is printed
per level, on the test cells, or with --unlabelled on the cells whose labels the run never saw
(partial-label runs). The guard acts in the final refit only, so the run as trained is the guarded
one. Existing refits are reused; one JSON line per run.

    python analyses/tuning/tree/fragment_guard.py RUN [RUN ...] [--unlabelled] >> fragment_guard.jsonl
"""
import argparse
import json
import sys
from pathlib import Path

import anndata
import numpy as np
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import scvae_hier.tree_clustering as tree  # noqa: E402
from scvae_hier.refit import refit_run  # noqa: E402


def level_aris(run, unlabelled):
    """ARI of the run's own clusters against the annotation, per level, on its test (or never-labelled) cells."""
    cells = anndata.read_h5ad(Path(run) / "outputs.h5ad")
    levels = sorted(c[len("scvae_"):-len("_cluster")] for c in cells.obs if c.startswith("scvae_level_")
                    and c.endswith("_cluster"))
    chosen = ~cells.obs["labelled"].to_numpy(bool) if unlabelled else (cells.obs["split"] == "test").to_numpy()
    known = chosen & cells.obs[levels[-1]].notna().to_numpy()
    return [round(adjusted_rand_score(cells.obs[level][known].astype(str), cells.obs[f"scvae_{level}_cluster"][known].astype(str)), 4)
            for level in levels]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--unlabelled", action="store_true", help="score the cells never labelled, not the test cells")
    args = parser.parse_args()
    for run in map(Path, args.runs):
        without = run.parent / f"{run.name}_noguard"
        if not (without / "outputs.h5ad").exists():
            share, tree.MIN_CLASS_SHARE = tree.MIN_CLASS_SHARE, 0.0
            try:
                refit_run(run, without, log=lambda *_: None, overwrite=True)
            finally:
                tree.MIN_CLASS_SHARE = share
        guard, before = level_aris(run, args.unlabelled), level_aris(without, args.unlabelled)
        print(json.dumps({"run": str(run), "cells": "unlabelled" if args.unlabelled else "test", "guard": guard,
                          "no_guard": before, "difference": list(np.round(np.subtract(guard, before), 4))}),
              flush=True)


if __name__ == "__main__":
    main()
