"""Print the README's results table of an experiment's results folder (issue 12's layout).

    python analyses/results_table.py analyses/results_tree

One row per group (model, peer, original scVAE): ARI per level as mean ± 95% interval over folds
with the min-max over folds, finest-level weighted F1, nesting (lowest level mean, levels 2..L)
and hierarchy consistency, read from the folder's runs.csv and summary.csv as the experiment
wrote them.
"""
import sys
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


def table(folder) -> str:
    runs = pd.read_csv(Path(folder) / "runs.csv")
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
    for folder in sys.argv[1:]:
        print(f"{folder}:\n{table(folder)}\n")
