"""Tuning runs for the partial-labels experiment, scored on validation cells only.

    python analyses/partial_labels/tune.py NAME key=value ...

Trains a semi-supervised TreeVAE on the nine PBMC populations with 5% of the cells labelled at
the finest level, with seed 100 (a mask and split that the reported seeds 0-2 do not use), and
scores ARI per level on the run's unlabelled *validation* cells; one line per run is appended to
analyses/partial_labels/tuning.txt. Runs go to runs/partial_tuning/NAME.
"""
import os
import sys
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PBMC, ROOT, score_run  # noqa: E402

import anndata  # noqa: E402
import numpy as np  # noqa: E402

from scvae_hier.hierarchy import Hierarchy  # noqa: E402
from scvae_hier.options import TrainOptions  # noqa: E402
from scvae_hier.training import train  # noqa: E402


def parse(value):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if "," in value or value == "":
        return tuple(parse(v) for v in value.split(",") if v)
    return value


if __name__ == "__main__":
    name, *pairs = sys.argv[1:]
    settings = dict(PBMC, labelled=("level_4=0.05",), seed=100)  # seed=101 etc. as a key=value to check a choice
    for pair in pairs:
        key, value = pair.split("=", 1)
        settings[key] = tuple(value.split(";")) if key == "markers" else parse(value)  # markers=CLASS=G,G;CLASS=G
    folder = ROOT / "runs" / "partial_tuning" / name
    if not (folder / "metrics.json").exists():
        train(TrainOptions(**settings, output=str(folder), overwrite=True))
    hierarchy = Hierarchy.from_anndata(anndata.read_h5ad(settings["data"], backed="r"))
    outputs = anndata.read_h5ad(folder / "outputs.h5ad")
    validation = (outputs.obs["split"] == "validation").to_numpy()
    outputs.obs["labelled"] = outputs.obs["labelled"].to_numpy(bool) | ~validation  # score validation cells only
    tmp = folder / "validation_view"
    tmp.mkdir(exist_ok=True)
    outputs.write_h5ad(tmp / "outputs.h5ad")
    row, _ = score_run(tmp, hierarchy)
    if settings.get("hide_labels"):  # share of the hidden type's validation cells called unassigned
        hidden = np.isin(outputs.obs[hierarchy.label_column].astype(str), settings["hide_labels"]) & validation
        row["novel"] = float((outputs.obs["scvae_level_4"].astype(str)[hidden] == "unassigned").mean())
    line = (f"{name:28s} {' '.join(pairs):50s} ARI " + " / ".join(f"{row[f'ari_{i}']:.3f}" for i in range(1, 5))
            + f"  L4 macro F1 {row['macro_f1_4']:.3f}  hF1 {row['hierarchical_f1']:.3f}  n={row['n_scored']}"
            + (f"  hidden type unassigned {row['novel']:.2f}" if "novel" in row else ""))
    print(line)
    with open(Path(__file__).resolve().parent / "tuning.txt", "a") as handle:
        handle.write(line + "\n")
