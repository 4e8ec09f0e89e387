"""Score tuning runs on their VALIDATION cells only (the test cells stay unseen while choosing settings).

    python analyses/tuning/score_runs.py tuning_runs/*/        # one row per run, then per setting

Per run: ARI and Hungarian weighted F1 per level of the model's own argmax clusters, level 1's
macro F1 and the F1 of its stem class, hierarchy consistency (hierarchical models), the
validation ELBO at the best epoch (the one whose weights were kept) and the clusters in use on
the validation cells per level. Runs named <setting>_s<seed> are also averaged per setting.
Each run's scores are written to <run>/validation_scores.json.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import anndata
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scvae_hier.metrics import hungarian_f1, level_scores  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402

STEM = "Stem"


def score_run(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    history = pd.read_csv(folder / "history.csv")
    hierarchy = Hierarchy.from_dict(config["hierarchy"])
    cells = anndata.read_h5ad(folder / "outputs.h5ad", backed="r")
    obs = cells.obs
    validation = (obs["split"] == "validation").to_numpy()
    labels = obs[hierarchy.label_column].astype(str).to_numpy()[validation]
    if "scvae_cluster" in obs:
        predictions = obs["scvae_cluster"].astype(str).to_numpy()[validation]
    else:
        predictions = [obs[f"scvae_{level}_cluster"].astype(str).to_numpy()[validation] for level in hierarchy.levels]
    scores = level_scores(hierarchy, labels, predictions)
    level_1 = hierarchy.level_labels(labels)[:, 0]
    first = predictions[0] if isinstance(predictions, list) else predictions
    f1_first = hungarian_f1(level_1, first)
    best = metrics.get("best_epoch")
    row = history.loc[history["epoch"] == best] if best is not None else history.tail(1)
    result = {"run": folder.name, "model": metrics.get("model"), "best_epoch": best,
              "epochs_run": metrics.get("epochs_run"), "val_elbo": float(row["val_elbo"].iloc[0]),
              "consistency": scores.attrs["hierarchy_consistency"],
              "level_1_macro_f1": f1_first["macro"], "stem_f1": f1_first["per_class"].get(STEM, float("nan"))}
    for i, level in enumerate(hierarchy.levels, start=1):
        result[f"ari_{i}"] = float(scores.loc[level, "ari"])
        result[f"f1w_{i}"] = float(scores.loc[level, "f1_weighted"])
        result[f"used_{i}"] = int(scores.loc[level, "n_clusters_used"])
    (folder / "validation_scores.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def setting_of(name: str) -> str:
    return re.sub(r"_s\d+$", "", name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for folder in args.runs:
        if (folder / "metrics.json").exists():
            rows.append(score_run(folder))
    table = pd.DataFrame(rows).set_index("run")
    pd.set_option("display.width", 250, "display.max_columns", 40, "display.max_rows", 400)
    shown = ["val_elbo", "best_epoch", *[c for c in table.columns if re.match(r"(ari|f1w|used)_\d", c)],
             "consistency", "level_1_macro_f1", "stem_f1"]
    print(table[shown].round(3).to_string())
    numeric = table[[c for c in shown if c != "best_epoch"]].astype(float)
    grouped = numeric.groupby(table.index.map(setting_of))
    print("\nmean over seeds (n):")
    means = grouped.mean().round(3)
    means.insert(0, "n", grouped.size())
    print(means.to_string())
    return table


if __name__ == "__main__":
    main()
