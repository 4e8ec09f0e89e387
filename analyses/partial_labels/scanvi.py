"""scANVI (scvi-tools) as the flat baseline of the partial-labels experiment (issue 16).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 /work/scvi_venv/bin/python analyses/partial_labels/scanvi.py \
        [--runs /work/partial_snapshot/runs/partial]

Runs with the python of a separate virtual environment that has scvi-tools (scvi-tools is not, and
must not become, a dependency of scvae-hier); from this package it imports only
scvae_hier.metrics.hierarchical_f1 (no TensorFlow).

For every finished TreeVAE run folder of analyses/partial_labels/run.py (one with metrics.json and
labels.csv) it takes the same cells (outputs.h5ad), genes (config.json) and label mask (labels.csv)
from the raw counts, trains scVI (scvi-tools defaults except 20 latent dimensions as our runs, at
most 100 epochs with early stopping off, batch covariate source_dataset as our runs), then scANVI
from it (20 epochs, default classification ratio; `--scvi-epochs 400`, scvi-tools' own default
for this many cells, gives the rows "scanvi_scvi400"), and scores the cells that are unlabelled at
every level, like run.py scores TreeVAE. One row per run is appended to scanvi_results.csv (the
columns of results.csv, method "scanvi"); a rerun skips the runs already there.
`--samples-per-label N` passes scANVI's `n_samples_per_label`: each epoch it draws at most N labelled
cells of every class (a cap on the large classes, no oversampling of the small ones; N at the smallest
labelled class's count balances them).
`--seed-offset N` trains scANVI with the mask's seed plus N (rows "scanvi_seed+N") and `--method
NAME` names the rows (the same seed again on another machine: "scanvi_rerun"), so that scANVI's own
training noise on a mask can be averaged out (`against_scanvi.py`).
"""
import argparse
import csv
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
import scvi  # noqa: E402
import torch  # noqa: E402
from scvi.dataloaders import SemiSupervisedDataSplitter  # noqa: E402
from sklearn.metrics import accuracy_score, adjusted_rand_score, f1_score  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scvae_hier.metrics import hierarchical_f1  # noqa: E402  (numpy only: no TensorFlow)
from scanvi_methods import DEFAULT_SCVI_EPOCHS, method_name  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = ROOT / "data" / "pbmc.h5ad"
RESULTS = HERE / "scanvi_results.csv"
RUNS = Path("/work/partial_snapshot/runs/partial")
COLUMNS = ["setting", "method", "seed", "n_scored", "n_labelled"] + \
    [f"{m}_{i}" for m in ("ari", "accuracy", "macro_f1") for i in range(1, 5)] + \
    ["hierarchical_f1", "consistency", "novel_unassigned", "seconds"]
SCVI_EPOCHS, SCANVI_EPOCHS = DEFAULT_SCVI_EPOCHS, 20
if os.environ.get("SCANVI_SMOKE"):  # a quick end-to-end check of this script: 2 epochs, results in /tmp
    SCVI_EPOCHS, SCANVI_EPOCHS, RESULTS = 2, 2, Path("/tmp/scanvi_smoke.csv")
UNKNOWN = "Unknown"


def done_keys():
    if not RESULTS.exists():
        return set()
    table = pd.read_csv(RESULTS)
    return set(zip(table["setting"], table["method"], table["seed"].astype(int)))


def append(row):
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def scanvi_batch_size(model, batch_size=128, samples_per_label=None):
    """scvi-tools' default minibatch size (128), unless scANVI's last training minibatch (of all
    training cells or of the labelled ones) would have 1 or 2 cells: a 1-cell minibatch breaks
    BatchNorm, and scvi-tools guards the labelled and unlabelled splits only one at a time (it
    happens with 83 labelled cells: 75 + 7478 = 7553 = 59 * 128 + 1). Then the next size that
    leaves no such minibatch. The splitter below is the one scANVI.train builds (same split). With
    `samples_per_label` scANVI draws at most that many labelled cells of each class an epoch, so the
    labelled minibatches come from that many."""
    while True:
        splitter = SemiSupervisedDataSplitter(model.adata_manager, train_size=0.9, batch_size=batch_size)
        splitter.setup()
        labelled = np.intersect1d(splitter.train_idx, splitter._labeled_indices)
        n_labelled = len(labelled)
        if samples_per_label:
            classes = model.adata.obs["scanvi_label"].to_numpy()[labelled]
            n_labelled = sum(min(count, samples_per_label) for count in np.unique(classes, return_counts=True)[1])
        sizes = len(splitter.train_idx), n_labelled
        if not any(0 < n % batch_size < 3 for n in sizes):
            return batch_size
        batch_size += 1


def train_scanvi(adata, seed, scvi_epochs=SCVI_EPOCHS, scanvi_epochs=None, samples_per_label=None):
    """scVI, then scANVI from it; the predicted class of every cell (labels in obs "scanvi_label").
    `samples_per_label`: scANVI's `n_samples_per_label` (each epoch draws at most that many labelled
    cells of every class: classes larger than it are subsampled, smaller ones are not repeated)."""
    scvi.settings.seed = seed
    torch.set_num_threads(1)
    scvi.model.SCVI.setup_anndata(adata, batch_key="source_dataset")
    vae = scvi.model.SCVI(adata, n_latent=20)
    vae.train(max_epochs=scvi_epochs, early_stopping=False, accelerator="cpu", enable_progress_bar=False)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN, labels_key="scanvi_label")
    batch_size = scanvi_batch_size(model, samples_per_label=samples_per_label)
    if batch_size != 128:
        print(f"scANVI minibatch size {batch_size} (128 would leave a 1- or 2-cell minibatch)", flush=True)
    model.train(max_epochs=scanvi_epochs or SCANVI_EPOCHS, batch_size=batch_size, accelerator="cpu", enable_progress_bar=False,
                n_samples_per_label=samples_per_label)
    return np.asarray(model.predict(adata), dtype=str)


def level_scores(truth, predicted, paths):
    """Per-level ARI / accuracy / macro F1 of predicted paths (cells x levels predicted, the top
    levels of `truth`), scHPL's hierarchical F1 when every level is predicted, and the share of
    predicted paths that are paths of the hierarchy (1.0 for leaf predictions mapped up)."""
    row, depth = {}, predicted.shape[1]
    for i in range(depth):  # levels below the predicted ones are not scored (left empty)
        t, p = truth[:, i], predicted[:, i].astype(str)
        row[f"ari_{i + 1}"] = adjusted_rand_score(t, p)
        row[f"accuracy_{i + 1}"] = accuracy_score(t, p)
        row[f"macro_f1_{i + 1}"] = f1_score(t, p, labels=sorted(set(t)), average="macro", zero_division=0)
    if depth == truth.shape[1]:
        row["hierarchical_f1"] = hierarchical_f1(truth, predicted)
    prefixes = {tuple(p)[:depth] for p in paths.values()}
    row["consistency"] = float(np.mean([tuple(p) in prefixes for p in predicted]))
    return row


def score_folder(folder, pbmc, levels, paths, scvi_epochs=SCVI_EPOCHS, seed_offset=0, scanvi_epochs=None,
                 samples_per_label=None):
    """Train on one run folder's cells, genes and mask (scANVI's training seed: the mask's seed
    plus `seed_offset`); its results row."""
    config = json.loads((folder / "config.json").read_text())
    labels = pd.read_csv(folder / "labels.csv", index_col="cell", keep_default_na=False)[levels]
    cells = anndata.read_h5ad(folder / "outputs.h5ad", backed="r").obs_names
    assert list(labels.index) == list(cells), "labels.csv and outputs.h5ad disagree on the cells"
    adata = pbmc[cells, config["genes"]].copy()  # raw counts of the run's cells and genes, in order

    # scANVI is flat: it takes one label per cell. Train it on the finest level that has labels in
    # the mask; cells labelled only at a coarser level (l2_10pct_fine_1pct) are unlabelled for it.
    finest = max(i for i in range(len(levels)) if (labels.iloc[:, i] != "").any())
    adata.obs["scanvi_label"] = pd.Categorical(labels.iloc[:, finest].replace("", UNKNOWN).to_numpy())
    start = time.time()
    guess = train_scanvi(adata, config["options"]["seed"] + seed_offset, scvi_epochs, scanvi_epochs, samples_per_label)
    seconds = time.time() - start

    # Score the cells unlabelled at every level whose true leaf is in the hierarchy (as run.py).
    scored = ((labels == "").all(axis=1) & adata.obs["source_library"].astype(str).isin(list(paths))).to_numpy()
    truth = np.stack([adata.obs[level].astype(str).to_numpy()[scored] for level in levels], 1)
    # The predicted class at the finest labelled level, mapped up the hierarchy (so always consistent).
    up = {tuple(path)[finest]: tuple(path)[:finest + 1] for path in paths.values()}
    assert len(up) == len({tuple(p)[:finest + 1] for p in paths.values()}), "class names not unique at a level"
    predicted = np.array([up[g] for g in guess[scored]], dtype=object)
    row = level_scores(truth, predicted, paths)
    novel = adata.obs["source_library"].astype(str).to_numpy()[scored] == "cd14_monocytes"
    if folder.name.startswith("unknown_cd14") and novel.any():
        # scANVI has no unknown class: every never-labelled cd14_monocytes cell gets a labelled class.
        given = predicted[novel, -1].astype(str)
        row["novel_unassigned"] = float(np.mean(given == "unassigned"))
        print("cd14_monocytes cells given a labelled class:", float(np.mean(given != "unassigned")),
              pd.Series(given).value_counts().to_dict(), flush=True)
    return dict(row, n_scored=int(scored.sum()), n_labelled=int((labels != "").any(axis=1).sum()),
                seconds=round(seconds, 1))


def finished_folders(runs):
    """(setting, seed, folder) of every finished labelled run folder <setting>_s<seed>."""
    for folder in sorted(runs.iterdir()):
        setting, _, seed = folder.name.rpartition("_s")
        if seed.isdigit() and (folder / "metrics.json").exists() and (folder / "labels.csv").exists():
            yield setting, int(seed), folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--only", nargs="+", default=None, help="run folder names")
    parser.add_argument("--scvi-epochs", type=int, default=SCVI_EPOCHS, help="scVI's epochs before scANVI")
    parser.add_argument("--scanvi-epochs", type=int, default=SCANVI_EPOCHS,
                        help="scANVI's epochs after scVI (20, the issue's protocol; pass --method to name the rows)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="train scANVI with the mask's seed plus this (rows 'scanvi_seed+N'): its own training "
                             "noise on one mask, which one run per mask leaves in the comparison")
    parser.add_argument("--samples-per-label", type=int, default=None,
                        help="scANVI's n_samples_per_label (at most N labelled cells of each class per epoch; default: "
                             "none, the issue's protocol; pass --method to name the rows)")
    parser.add_argument("--method", default=None,
                        help="the rows' method name instead of the default (e.g. scanvi_rerun: the same seed again "
                             "on another machine)")
    args = parser.parse_args()
    method = args.method or method_name(args.scvi_epochs, args.seed_offset, SCVI_EPOCHS)
    torch.set_num_threads(1)
    pbmc = anndata.read_h5ad(DATA)
    levels = [str(level) for level in pbmc.uns["hierarchy"]["levels"]]
    paths = {leaf: [str(c) for c in path] for leaf, path in pbmc.uns["hierarchy"]["paths"].items()}
    for setting, seed, folder in finished_folders(args.runs):
        if (setting, method, seed) in done_keys() or (args.only and folder.name not in args.only):
            continue
        print(f"== {folder.name}", flush=True)
        append(dict(score_folder(folder, pbmc, levels, paths, args.scvi_epochs, args.seed_offset, args.scanvi_epochs,
                                 args.samples_per_label),
                    setting=setting, seed=seed, method=method))
