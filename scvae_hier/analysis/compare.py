"""Several runs side by side: per-level scores of each run, their mean with a 95% interval per
model x prior, original-scVAE runs scored on the very same cells, and Figure 1 (F1 and ARI at
one level against the IWAE bound).

Intervals are Student-t intervals over runs (folds or seeds): mean +- t(0.975, n-1) s / sqrt(n);
one run has no interval.
"""
from dataclasses import replace
from pathlib import Path

import anndata
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from ..runs import RunDirectory  # noqa: E402
from .scvae_runs import ScvaeRunError, read_scvae_run, scvae_level_scores  # noqa: E402

SCORES = ["ari", "nmi", "ami", "f1_weighted", "f1_macro", "accuracy_hungarian", "accuracy_majority",
          "n_clusters_used"]
MODEL_NAMES = {"mixture": "MixtureVAE", "indmom": "IndMoMVAE", "momix": "MoMixVAE", "tree": "TreeVAE", "vae": "VAE"}
SCVAE_GROUP = "original scVAE"
MIN_SHARED = 0.99  # of our evaluated cells that an scVAE run must also hold


def group_name(config: dict) -> str:
    """'MoMixVAE Normal' etc.; the MoMixVAE inference mode when not the default."""
    options = config["options"]
    name = f"{MODEL_NAMES.get(options['model'], options['model'])} {options['prior'].replace('_', '-').title()}"
    if options["model"] == "momix" and options.get("inference", "scalable") != "scalable":
        name += f" ({options['inference']})"
    return name.replace("Student-T", "Student-t")


def run_rows(run_path, group, bounds, levels) -> pd.DataFrame:
    """One row per level of one evaluated run of `group` (e.g. group_name(config))."""
    rows = levels[[c for c in SCORES if c in levels]].copy()
    rows.insert(0, "run", str(run_path))
    rows.insert(0, "group", group)
    rows["iwae"] = bounds["iwae"]["mean"]
    rows["elbo"] = bounds["terms"]["elbo"]["mean"]
    rows["n_cells"] = bounds["n_cells"]
    consistency = levels.attrs.get("hierarchy_consistency")
    rows["hierarchy_consistency"] = np.nan if consistency is None else float(consistency)
    rows["nesting"] = levels["nesting"] if "nesting" in levels else np.nan
    return rows.reset_index()


def scvae_rows(scvae_path, cells_by_run, hierarchy_by_run) -> pd.DataFrame:
    """An original-scVAE run scored on each distinct set of cells our runs were evaluated on (same
    cells, same labels), so that it is averaged over the same folds as they are.

    cells_by_run: {run: AnnData of the cells that run was evaluated on (with labels)}."""
    scvae = read_scvae_run(scvae_path)
    frames, seen = [], set()
    for run, cells in cells_by_run.items():
        ours = cells.obs_names.astype(str)
        if frozenset(ours) in seen:  # runs of different models on the same fold: score it once
            continue
        seen.add(frozenset(ours))
        hierarchy = hierarchy_by_run[run]
        shared = scvae.cluster_ids.index.isin(ours)
        if shared.sum() < MIN_SHARED * len(ours):
            raise ScvaeRunError(
                f"the scVAE run {scvae.path} holds only {int(shared.sum())} of the {len(ours)} cells {run} was "
                f"evaluated on; compare runs on the same cells (scVAE's cell ids are the data's obs_names).")
        labels = pd.Series(cells.obs[hierarchy.label_column].astype(str).to_numpy(), index=ours)
        levels = scvae_level_scores(replace(scvae, cluster_ids=scvae.cluster_ids[shared]), hierarchy, labels)
        rows = levels[SCORES].copy()
        rows.insert(0, "run", f"{scvae_path} (cells of {run})")
        rows.insert(0, "group", SCVAE_GROUP)
        rows["iwae"] = np.nan  # scVAE logs no importance-weighted bound at iw_1
        rows["elbo"] = float(scvae.metrics.get("ELBO", np.nan))  # its log, over every cell it saw
        rows["n_cells"] = levels.attrs["n_cells"]
        rows["hierarchy_consistency"] = rows["nesting"] = np.nan  # one flat clustering
        frames.append(rows.reset_index())
    return pd.concat(frames, ignore_index=True)


def interval(values) -> tuple:
    """(mean, half-width of the 95% Student-t interval; NaN for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan, np.nan
    if values.size < 2:
        return float(values.mean()), np.nan
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean()), float(half)


def summarise(rows: pd.DataFrame, columns=("ari", "nmi", "f1_weighted", "f1_macro", "accuracy_hungarian",
                                            "accuracy_majority", "n_clusters_used", "hierarchy_consistency",
                                            "nesting", "iwae")) -> pd.DataFrame:
    """Mean and 95% half-width per group and level: columns <score>_mean, <score>_ci, and n_runs
    (rows: runs of ours; for an scVAE run, the distinct cell sets it was scored on)."""
    records = []
    for (group, level), part in rows.groupby(["group", "level"], sort=False):
        record = {"group": group, "level": level, "n_runs": len(part)}
        for column in columns:
            record[f"{column}_mean"], record[f"{column}_ci"] = interval(part[column])
        records.append(record)
    return pd.DataFrame(records)


def markdown(table: pd.DataFrame, digits=3) -> str:
    """A DataFrame as a Markdown table (floats to `digits` places)."""
    def text(value):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(str(c) for c in table.columns) + " |", "|" + "---|" * table.shape[1]]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _cell(mean, half, digits=3):
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if np.isfinite(half) else "")


def markdown_table(summary: pd.DataFrame, columns=("ari", "nmi", "f1_weighted", "f1_macro", "nesting",
                                                   "hierarchy_consistency", "iwae")) -> str:
    """Per level, one row per group: mean ± 95% half-width."""
    names = {"ari": "ARI", "nmi": "NMI", "f1_weighted": "F1 weighted", "f1_macro": "F1 macro",
             "accuracy_hungarian": "accuracy (Hungarian)", "accuracy_majority": "accuracy (majority)",
             "hierarchy_consistency": "hierarchy consistency", "iwae": "IWAE", "n_clusters_used": "clusters",
             "nesting": "nesting"}
    header = ["level", "model", "runs (scVAE: cell sets)"] + [names.get(c, c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [row["level"], row["group"], str(row["n_runs"])]
        cells += [_cell(row[f"{c}_mean"], row[f"{c}_ci"], 1 if c == "iwae" else 3) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure_one(rows: pd.DataFrame, level: str, path) -> Path:
    """F1 (weighted) and ARI at `level` against IWAE, mean ± 95% interval per group; runs without
    an IWAE (original scVAE) are drawn as a horizontal band."""
    part = rows[rows["level"] == level]
    if part.empty:
        raise ValueError(f"no scores at level {level!r}; levels are {sorted(rows['level'].unique())}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    groups = list(dict.fromkeys(part["group"]))
    markers = "osD^v<>Ph*X"
    for ax, score, title in ((axes[0], "f1_weighted", "weighted F1"), (axes[1], "ari", "ARI")):
        for i, group in enumerate(groups):
            g = part[part["group"] == group]
            y, dy = interval(g[score])
            x, dx = interval(g["iwae"])
            colour = f"C{i % 10}"
            label = f"{group} (n={len(g)})"
            if np.isfinite(x):
                ax.errorbar(x, y, xerr=0 if np.isnan(dx) else dx, yerr=0 if np.isnan(dy) else dy,
                            fmt=markers[i % len(markers)], color=colour, capsize=4, ms=8, label=label)
                ax.scatter(g["iwae"], g[score], color=colour, s=12, alpha=0.35)
            else:
                ax.axhline(y, color=colour, ls="--", label=f"{label}, no IWAE")
                if np.isfinite(dy):
                    ax.axhspan(y - dy, y + dy, color=colour, alpha=0.12)
        ax.set_xlabel("IWAE bound (nats per cell, higher is better)")
        ax.set_ylabel(f"{title} at {level}")
        ax.set_title(f"{title} vs IWAE at {level}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Figure 1: clustering against the IWAE bound (mean ± 95% interval over runs; faint dots: runs)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def evaluated_cells(run_path, name) -> anndata.AnnData:
    """The cells `scvae-hier evaluate` scored for a run (from its cells.h5ad). A run trained on labels
    with holes scored only the cells with a true leaf label (obs["scvae_scored"]); peers and the
    original scVAE are scored on those same cells, since the others have no truth."""
    cells = anndata.read_h5ad(RunDirectory(run_path).evaluation(name) / "cells.h5ad")
    if "scvae_scored" in cells.obs:
        cells = cells[cells.obs["scvae_scored"].to_numpy(bool)].copy()
    return cells
