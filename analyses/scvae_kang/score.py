"""The original scVAE (2.1.4) on Kang, scored on the test cells of each fold of issue 12's Kang
experiment (`analyses/kang.yaml`: the same prepared cells, folds and seed), beside that experiment's
committed summary (`analyses/results_kang/summary.csv`). The scVAE run saw every cell in training
(as the shipped PBMC reference did), which favours it on these cells.

    python analyses/scvae_kang/score.py data/scvae_reference_kang/analyses_s*_model   # one or more runs

Writes analyses/results_kang/original_scvae_runs.csv (one row per fold and level) and
original_scvae.md (the level means beside TreeVAE's and the peers'), and prints the table.
"""
import sys
from pathlib import Path

import pandas as pd
import yaml

from scvae_hier.analysis import compare
from scvae_hier.data import read_counts
from scvae_hier.hierarchy import Hierarchy
from scvae_hier.options import TrainOptions
from scvae_hier.training import make_split, prepare_cells

RESULTS = Path("analyses/results_kang")
SHOWN = ("TreeVAE Normal", "TreeVAE, megakaryocytes left empty", "scanpy PCA + Leiden",
         "Leiden on TreeVAE Normal's latent", compare.SCVAE_GROUP)


def experiment_cells(config):
    """(Cells, hierarchy, option values): every cell prepared as each run of the experiment was
    (its genes too: `build_loom.py` writes the original scVAE's input from these)."""
    values = {**config["options"], "data": config["data"], "folds": int(config["folds"]), "seed": int(config["seed"])}
    adata = read_counts(config["data"])
    hierarchy = Hierarchy.from_anndata(adata)
    return prepare_cells(adata, TrainOptions.from_dict(values), hierarchy), hierarchy, values


def fold_test_cells(config):
    """{fold name: AnnData of that fold's test cells}, prepared as every run of the experiment was."""
    cells, hierarchy, values = experiment_cells(config)
    tests = {}
    for fold in range(int(config["folds"])):
        split = make_split(cells, TrainOptions.from_dict({**values, "fold": fold}))
        tests[f"fold {fold}"] = cells.adata[split == "test"]
    return tests, hierarchy


def main(scvae_folders):
    config = yaml.safe_load(open("analyses/kang.yaml"))
    tests, hierarchy = fold_test_cells(config)
    rows = pd.concat([compare.scvae_rows(folder, tests, {name: hierarchy for name in tests}) for folder in scvae_folders],
                     ignore_index=True)   # every run on every fold's test cells
    rows.to_csv(RESULTS / "original_scvae_runs.csv", index=False)
    committed = pd.read_csv(RESULTS / "runs.csv")
    for name, test in tests.items():   # the same cells as the committed runs of that fold
        counts = committed[committed["run"].str.endswith(f"-f{name.split()[-1]}")]["n_cells"].unique()
        assert list(counts) == [test.n_obs], (name, counts, test.n_obs)
    summary = pd.concat([pd.read_csv(RESULTS / "summary.csv"), compare.summarise(rows)], ignore_index=True)
    summary = summary[summary["group"].isin(SHOWN)]
    table = summary.pivot_table(index="group", columns="level", values="ari_mean", sort=False)
    spread = summary.pivot_table(index="group", columns="level", values="ari_ci", sort=False)
    cells = table.map("{:.3f}".format) + " ± " + spread.map("{:.3f}".format)
    cells["L4 weighted F1"] = summary[summary["level"] == "level_4"].set_index("group")["f1_weighted_mean"].map(
        "{:.3f}".format)
    text = ("ARI of each method's own clusters on the test cells of Kang's 5 folds (mean ± 95% half-width; the "
            f"original scVAE: {len(scvae_folders)} training run(s) x 5 folds; `python analyses/scvae_kang/score.py "
            + " ".join(map(str, scvae_folders)) + "`)\n\n" + compare.markdown(cells.reset_index()))
    training = rows.assign(training=rows["run"].str.split(" (cells of", regex=False).str[0])
    per_run = training.pivot_table(index="training", columns="level", values="ari", sort=False).map("{:.3f}".format)
    text += ("\n\nThe original scVAE per training run (ARI, mean over the 5 folds' test cells):\n\n"
             + compare.markdown(per_run.reset_index()))
    (RESULTS / "original_scvae.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
