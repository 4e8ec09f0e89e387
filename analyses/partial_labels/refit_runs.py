"""Bring the experiment's finished TreeVAE runs to the current final refit without training again.

    python analyses/partial_labels/refit_runs.py [RUN_FOLDER ...]     # default: every labelled run in runs/partial

A change to TreeVAE's final refit (what it does once training ends) changes nothing in training, so
`scvae-hier refit` on a finished run gives exactly what training it with the new code would have
written (`scvae_hier.refit`). For every labelled TreeVAE run of `run.py`, this redoes the final refit
with the code installed now into runs/partial_refit/NAME, compares every cell's clusters with the
run's own, and appends a line to refit_runs.jsonl: whether anything changed, and ARI per level on
the never-labelled cells before and after. Where something changed, the run's `treevae` row in
results.csv is replaced by the refitted run's scores (its training seconds kept) and the refitted
folder takes the run's place (the old one kept as runs/partial_refit/NAME_before). Resumable: runs
with a line already are skipped.
"""
import fcntl
import functools
import json
import os
import shutil
import sys
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import anndata  # noqa: E402
import pandas as pd  # noqa: E402

from run import HERE, RESULTS, ROOT, RUNS, setting_scores  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402
from scvae_hier.refit import refit_run  # noqa: E402

LOG = HERE / "refit_runs.jsonl"
REFITS = ROOT / "runs" / "partial_refit"


def labelled_tree_runs():
    for folder in sorted(RUNS.glob("*_s*")):
        config = folder / "config.json"
        if config.exists() and (folder / "outputs.h5ad").exists():
            options = json.loads(config.read_text())["options"]
            if options.get("model") == "tree" and options.get("semi_supervised"):
                yield folder


@functools.lru_cache(maxsize=None)
def hierarchy_of(data):
    return Hierarchy.from_anndata(anndata.read_h5ad(data, backed="r"))


def cluster_columns(adata):
    return adata.obs[[c for c in adata.obs.columns if c.startswith("scvae_level_")]].astype(str).to_numpy()


def replace_row(setting, seed, row):
    REFITS.mkdir(parents=True, exist_ok=True)
    with open(REFITS / "results.lock", "w") as lock:   # two lanes may finish at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_row(setting, seed, row)


def _replace_row(setting, seed, row):
    """Replace the scores of one row in place, every other field as written (strings, not re-parsed)."""
    table = pd.read_csv(RESULTS, dtype=str, keep_default_na=False)
    at = (table["setting"] == setting) & (table["method"] == "treevae") & (table["seed"] == str(seed))
    if at.sum() != 1:
        raise ValueError(f"results.csv has {at.sum()} treevae rows for {setting} seed {seed}; expected 1.")
    for key, value in row.items():
        if key in table.columns and key not in ("setting", "method", "seed", "seconds"):
            table.loc[at, key] = str(round(value, 4) if isinstance(value, float) else value)
    table.to_csv(RESULTS, index=False, lineterminator="\n")


def main(folders):
    done = {json.loads(line)["run"] for line in LOG.read_text().splitlines()} if LOG.exists() else set()
    for folder in folders:
        folder = Path(folder)
        if folder.name in done:
            continue
        setting, seed = folder.name.rsplit("_s", 1)
        hierarchy = hierarchy_of(json.loads((folder / "config.json").read_text())["options"]["data"])
        new = REFITS / folder.name
        refit_run(folder, new, log=lambda *args: None, overwrite=True)
        before, old_cells = setting_scores(folder, hierarchy, setting)
        after, new_cells = setting_scores(new, hierarchy, setting)
        changed = int((cluster_columns(old_cells) != cluster_columns(new_cells)).any(axis=1).sum())
        line = dict(run=folder.name, setting=setting, seed=int(seed), cells_changed=changed,
                    before=[round(before[f"ari_{i}"], 4) for i in range(1, 5)])
        if changed:
            line["after"] = [round(after[f"ari_{i}"], 4) for i in range(1, 5)]
            replace_row(setting, int(seed), after)
            old = REFITS / f"{folder.name}_before"
            shutil.rmtree(old, ignore_errors=True)
            shutil.move(str(folder), str(old))
            shutil.move(str(new), str(folder))
        else:
            shutil.rmtree(new)
        print(json.dumps(line), flush=True)
        with open(LOG, "a") as handle:
            handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or list(labelled_tree_runs()))
