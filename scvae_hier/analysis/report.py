"""`scvae-hier analyse`: the figures and a Markdown report of one run, or of several runs (and
original-scVAE runs) side by side in a comparison folder.

Scores come from `scvae-hier evaluate` (RUN/evaluation/<set>/); a run not yet evaluated on that
set is evaluated first, so `analyse` alone is enough after training.
"""
import json
import re
from pathlib import Path

import pandas as pd

from . import compare
from .figures import figures_for_run
from ..hierarchy import Hierarchy
from .evaluate import (COLUMNS, DEFAULT_IWAE_SAMPLES, evaluate_run, read_evaluation, scored_note,
                                       write_evaluation)
from ..runs import RunDirectory

FIGURE_NOTES = {
    "true_vs_predicted.png": "Figure 2: true classes (top) and predicted clusters, Hungarian-matched to class "
                             "names (bottom), at every level, on a 2-D embedding of the latent (all cells).",
    "hierarchy_matrix.png": "Figure 3: latent hierarchy matrix (all cells); column m colours the latent by level "
                            "m's classes; IndMoMVAE has one row per level (that level's own latent), models with "
                            "one latent for every level (MixtureVAE, MoMixVAE) one row.",
    "learning_curves.png": "Learning curves of every loss term (train solid, validation dashed), the KL "
                           "weight and the components in use per level.",
    "confusion_matrices.png": "Confusion matrix per level (all cells): true classes x clusters in matched "
                              "order; * marks clusters matched to no class.",
}


def evaluation_of(run, subset, iwae_samples, progress=print):
    """(bounds, per-level scores) of a run on a set, evaluating it first when needed."""
    found = read_evaluation(run, subset)
    if found is not None:
        progress(f"{run}: using its evaluation on the {subset} cells (IWAE with {found[0]['iwae_samples']} "
                 f"samples); rerun `scvae-hier evaluate` to replace it.")
        return found
    progress(f"{run}: evaluating on the {subset} cells (IWAE with {iwae_samples} samples) ...")
    evaluation = evaluate_run(run, subset=subset, iwae_samples=iwae_samples, progress=_batches(progress))
    write_evaluation(evaluation)
    return evaluation.bounds, evaluation.levels


def _batches(progress):
    """IWAE progress as a line every ~10% of batches."""
    def report(done, total):
        if done == total or done % max(1, total // 10) == 0:
            progress(f"  IWAE: batch {done}/{total}")
    return report


def slug(text):
    """A file-name-safe lower-case form of a group or level name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _figure_lines(paths, relative_to):
    lines = []
    for path in paths:
        path = Path(path)
        lines += [f"![{path.stem}]({path.relative_to(relative_to).as_posix()})", "",
                  FIGURE_NOTES.get(path.name, ""), ""]
    return lines


def _level_markdown(levels):
    return [compare.markdown(levels[[c for c in COLUMNS if c in levels]].rename(columns=COLUMNS).reset_index())]


def run_report(run, subset="test", iwae_samples=DEFAULT_IWAE_SAMPLES, embedding="umap", progress=print) -> Path:
    """Figures in RUN/figures and RUN/report.md."""
    run = RunDirectory(run)
    config = run.read_config()
    bounds, levels = evaluation_of(run.path, subset, iwae_samples, progress)
    figures = figures_for_run(run.path, method=embedding, progress=progress)
    metrics = json.loads(run.metrics.read_text()) if run.metrics.is_file() else {}
    options = config["options"]
    lines = [f"# {run.path.name}: {compare.group_name(config)}", "",
             f"Trained on `{options['data']}`: {config['n_cells']} cells x {len(config['genes'])} genes "
             f"(split {config['split_counts']}), {metrics.get('epochs_run', '?')} epochs, best at epoch "
             f"{(metrics.get('best_epoch') or 0) + 1}, {metrics.get('seconds', '?')} s. All options are in "
             f"`config.json`.", "",
             f"## Bounds on the {bounds['n_cells']} {subset} cells", "",
             "| term | mean (nats per cell) | standard error |", "|---|---|---|",
             f"| IWAE, {bounds['iwae_samples']} samples | {bounds['iwae']['mean']:.2f} | "
             f"{bounds['iwae']['standard_error']:.2f} |"]
    lines += [f"| {term} | {value['mean']:.3f} | {value['standard_error']:.3f} |"
              for term, value in bounds["terms"].items()]
    if levels is not None:
        about = ("Clusters are the model's own argmax q(y|x) (a flat model's one clustering is scored against "
                 "every level). F1 and accuracy 'H' use a one-to-one Hungarian matching in which cells of "
                 "unmatched clusters count as wrong; 'acc maj' maps each cluster to its majority class "
                 "(scVAE's accuracy).")
        lines += ["", f"## Per-level clustering ({subset} cells)", "", f"{about} {scored_note(bounds)}".strip(), ""]
        lines += _level_markdown(levels)
        if levels.attrs.get("hierarchy_consistency") is not None:
            lines += ["", f"Hierarchy consistency (cells whose mapped per-level labels form a path of the "
                          f"hierarchy): {levels.attrs['hierarchy_consistency']:.3f}."]
        per_class = levels.attrs.get("per_class_f1", {})
        if per_class:
            first = next(iter(per_class))
            lines += ["", f"F1 of each class at {first}: " + ", ".join(
                f"{name} {value:.3f}" for name, value in per_class[first].items()) + "."]
        if "placement_margin" in metrics:  # TreeVAE: how clearly its leaves are grouped (README, "TreeVAE")
            lines += ["", f"Placement margin: {metrics['placement_margin']['reading']}"]
    lines += ["", "## Figures", ""] + _figure_lines(figures, run.path)
    lines += ["Per-cell outputs: `outputs.h5ad` (all cells) and `evaluation/<set>/cells.h5ad` (evaluated cells); "
              "keys in the README's 'Outputs' section."]
    path = run.report
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    progress(f"Report: {path}")
    return path


def comparison_report(runs, scvae=(), output=None, level=None, subset="test", iwae_samples=DEFAULT_IWAE_SAMPLES,
                      embedding="umap", figures=True, names=None, peers=False, progress=print) -> Path:
    """Runs (and original-scVAE runs) compared per level in `output`: runs.csv, summary.csv,
    Figure 1, Figures 2-3 of the first run of each model, and report.md. `names` maps a run to
    its group name when the default (model and prior) does not tell runs apart; `peers` adds
    Leiden at K_l on scanpy's PCA and on each run's latent, on the same cells (analysis.peers)."""
    if not runs:
        raise ValueError("Pass at least one scvae-hier run folder to compare.")
    output = Path(output or "runs/comparison")
    frames, cells_by_run, hierarchy_by_run, first_of_group = [], {}, {}, {}
    for run in runs:
        directory = RunDirectory(run)
        config = directory.read_config()
        bounds, levels = evaluation_of(directory.path, subset, iwae_samples, progress)
        if levels is None:
            raise ValueError(f"{run} has no per-level scores (no clusters or no labels); it cannot be compared.")
        group = (names or {}).get(str(run)) or compare.group_name(config)
        frames.append(compare.run_rows(run, group, bounds, levels))
        first_of_group.setdefault(group, directory.path)
        if scvae:
            cells_by_run[str(run)] = compare.evaluated_cells(directory.path, subset)
            labels = cells_by_run[str(run)].obs[config["hierarchy"]["label_column"]].astype(str).to_numpy()
            hierarchy_by_run[str(run)] = Hierarchy.from_dict(config["hierarchy"]).restrict(labels)
    for folder in scvae:
        progress(f"Scoring the original-scVAE run {folder} on the same cells ...")
        frames.append(compare.scvae_rows(folder, cells_by_run, hierarchy_by_run))
    if peers:
        from .peers import peer_rows
        progress("Scoring the peers (Leiden at K_l on scanpy's PCA and on each run's latent) on the same cells ...")
        groups = {str(run): frame["group"].iloc[0] for run, frame in zip(runs, frames)}
        frames.append(peer_rows(runs, groups, subset))
    rows = pd.concat(frames, ignore_index=True)
    level = level or rows["level"].iloc[-1]
    summary = compare.summarise(rows)
    output.mkdir(parents=True, exist_ok=True)
    rows.to_csv(output / "runs.csv", index=False)
    summary.to_csv(output / "summary.csv", index=False)
    figure_one = compare.figure_one(rows, level, output / f"figure1_{slug(level)}.png")
    progress(f"wrote {figure_one}")
    figure_paths = []
    if figures:
        for group, run in first_of_group.items():
            progress(f"Figures of {run} ({group}) ...")
            figure_paths.append((group, run, figures_for_run(run, output / "figures" / slug(group),
                                                             method=embedding, progress=progress)))

    n_ours = len(runs)
    lines = [f"# Comparison of {n_ours} run{'s' * (n_ours > 1)}" + (f" with {len(scvae)} original-scVAE run"
                                                                  f"{'s' * (len(scvae) > 1)}" if scvae else ""), "",
             f"Scores on each run's {subset} cells; original-scVAE runs are scored on exactly the cells of "
             f"each of our runs (matched by cell id), so every row compares the same cells. Mean ± 95% Student-t "
             f"interval over runs (folds or seeds); no interval for a single run. IWAE: nats per cell "
             f"(the original scVAE logs none).", "",
             "## Per-level scores", "", compare.markdown_table(summary), "",
             f"## Figure 1: weighted F1 and ARI at {level} against the IWAE bound", "",
             f"![Figure 1]({figure_one.name})", ""]
    chosen = rows[rows["level"] == level][["group", "run", "ari", "f1_weighted", "iwae", "n_cells"]]
    lines += [f"## Every run at {level}", "", compare.markdown(chosen), ""]
    for group, run, paths in figure_paths:
        lines += [f"## Figures of {group} ({run})", ""] + _figure_lines(paths, output)
    lines += ["Data: `runs.csv` (one row per run and level), `summary.csv` (means and interval half-widths)."]
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    progress(f"Report: {path}")
    return path


def analyse(runs, scvae=(), output=None, **kwargs) -> Path:
    """One run without scVAE runs: a run report; otherwise a comparison."""
    if len(runs) == 1 and not scvae and output is None:
        level = kwargs.pop("level", None)
        if level is not None:
            raise ValueError(f"--level {level} chooses the level of a comparison's Figure 1; one run's report "
                             f"shows every level. Leave it out, or compare runs (--output DIR).")
        kwargs.pop("figures", None)
        return run_report(runs[0], **kwargs)
    return comparison_report(runs, scvae, output, **kwargs)

