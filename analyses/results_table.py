"""Print the README's results table of an experiment's results folder (issue 12's layout).

    python analyses/results_table.py analyses/results_tree
    python analyses/results_table.py analyses/results_tree analyses/results_kang --peers-from analyses/scvi_peer/results.csv

One row per group (model, peer, original scVAE): ARI per level as mean ± 95% interval over folds
with the min-max over folds, finest-level weighted F1, nesting (lowest level mean, levels 2..L)
and hierarchy consistency, read from the folder's runs.csv and summary.csv as the experiment
wrote them. `--peers-from` adds the rows of a peer run outside the experiment (scVI + Leiden,
analyses/scvi_peer/, on the same folds' test cells) whose `data` is the experiment's data file,
and prints how far its check rows (scanpy's pipeline rerun there) are from the experiment's own.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def cell(values) -> str:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "–"
    text = f"{values.mean():.2f}"
    if values.size > 1:
        from scipy import stats
        half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
        text += f" ± {half:.2f} ({values.min():.2f} to {values.max():.2f})"
    return text


def outside_rows(folder, peers_csv) -> pd.DataFrame:
    """The rows of `peers_csv` for this experiment's data, in runs.csv's layout (run = data and fold)."""
    data = Path(json.loads((Path(folder) / "experiment.json").read_text())["config"]["data"]).stem
    rows = pd.read_csv(peers_csv)
    rows = rows[rows["data"] == data].copy()
    rows["run"] = rows["data"] + " fold " + rows["fold"].astype(str)
    return rows


def check(folder, peers_csv) -> str:
    """Largest difference per level between the outside check rows and the experiment's scanpy
    rows of the same folds (the experiment's run names end in -f<fold>)."""
    runs = pd.read_csv(Path(folder) / "runs.csv")
    ours = runs[runs["group"] == "scanpy PCA + Leiden"].copy()
    ours["fold"] = ours["run"].str.extract(r"-f(\d+)\)$", expand=False).astype(int)
    rows = outside_rows(folder, peers_csv)
    theirs = rows[rows["group"].str.endswith("(check)")]
    paired = ours.merge(theirs, on=["level", "fold"], suffixes=("", "_check"))
    gaps = (paired["ari"] - paired["ari_check"]).abs().groupby(paired["level"]).max()
    return (f"check rows vs the experiment's scanpy rows, {paired['fold'].nunique()} folds, largest ARI gap per level: "
            + (", ".join(f"{level} {gap:.4f}" for level, gap in gaps.items()) or "–"))


def table(folder, peers_csv=None) -> str:
    runs = pd.read_csv(Path(folder) / "runs.csv")
    if peers_csv:
        extra = outside_rows(folder, peers_csv)
        runs = pd.concat([runs, extra[~extra["group"].str.endswith("(check)")]], ignore_index=True)
    levels = list(dict.fromkeys(runs["level"]))
    header = ["model"] + [f"ARI {level}" for level in levels] + [f"{levels[-1]} weighted F1", "nesting (lowest)",
                                                                  "consistency"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, part in runs.groupby("group", sort=False):
        by_level = {level: part[part["level"] == level] for level in levels}
        nested = part[part["level"] != levels[0]].groupby("level")["nesting"].mean()
        consistency = part.groupby("run")["hierarchy_consistency"].first()
        row = [group] + [cell(by_level[level]["ari"]) for level in levels]
        row += [cell(by_level[levels[-1]]["f1_weighted"]),
                f"{nested.min():.2f}" if nested.notna().any() else "–", cell(consistency)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--peers-from", help="a CSV of peer rows run outside the experiment (analyses/scvi_peer)")
    arguments = parser.parse_args()
    for folder in arguments.folders:
        print(f"{folder}:\n{table(folder, arguments.peers_from)}\n")
        if arguments.peers_from:
            print(check(folder, arguments.peers_from) + "\n")
