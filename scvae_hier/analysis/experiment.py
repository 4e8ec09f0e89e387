"""`scvae-hier experiment CONFIG.yaml`: the reference experiment (DESIGN §7) as one resumable
command: every model x prior on every fold, trained, evaluated, compared with the original scVAE
on the same cells, and written up in the results folder.

Finished runs are skipped and interrupted ones resumed from their checkpoint, so rerunning the
command after an interruption continues where it stopped. Results are what the code wrote;
nothing in them is edited by hand.
"""
import gc
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import yaml

from . import compare
from .report import comparison_report, slug
from ..options import REFIT_OPTIONS, TrainOptions
from .evaluate import evaluate_run, read_evaluation, write_evaluation
from .peers import SCANPY_GROUP
from ..markers import genes_of
from ..outputs import clustering_of
from ..refit import refit_run
from ..runs import RunDirectory
from ..training import train

# The poster's level-4 table (DESIGN §7, read off its Figure 1).
POSTER = {"MixtureVAE Normal": (0.40, 0.36, -765), "MixtureVAE Student-t": (0.40, 0.34, -710),
          "IndMoMVAE Normal": (0.42, 0.34, -724), "IndMoMVAE Student-t": (0.42, 0.34, -715),
          "MoMixVAE Normal": (0.43, 0.33, -712), "MoMixVAE Student-t": (0.43, 0.33, -696)}
# Issue 5's targets for the best hierarchical model: (level, score) -> at least.
TARGETS = {("level_4", "ari"): 0.75, ("level_4", "f1_weighted"): 0.80, ("level_3", "ari"): 0.85,
           ("level_2", "ari"): 0.95}
REQUIRED = ("data", "folds", "models", "runs", "results")
HIERARCHICAL = ("IndMoMVAE", "MoMixVAE", "TreeVAE")


class ExperimentError(ValueError):
    """A configuration the experiment cannot run."""


def read_config(path) -> dict:
    """The YAML configuration, checked: unknown training options are named before anything runs."""
    path = Path(path)
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise ExperimentError(f"{path} lacks {', '.join(missing)}; see analyses/poster.yaml for a complete example.")
    known = set(TrainOptions.__dataclass_fields__)
    for entry in [config.get("options", {})] + list(config["models"]):
        unknown = sorted(set(entry) - known - {"name"})
        if unknown:
            raise ExperimentError(f"{path}: unknown training option(s) {unknown}; `scvae-hier train --help` "
                                  f"lists them (use underscores, e.g. exclude_labels).")
    return config


def planned_runs(config) -> list:
    """(group name, TrainOptions) for every fold x model, fold by fold, so partial results cover
    every model."""
    plan = []
    for fold in range(int(config["folds"])):
        for entry in config["models"]:
            values = {**config.get("options", {}), **{k: v for k, v in entry.items() if k != "name"}}
            name = entry.get("name")
            folder = slug(name) if name else f'{values["model"]}-{values.get("prior", "normal")}'
            options = TrainOptions.from_dict({**values, "data": config["data"], "folds": int(config["folds"]),
                                              "fold": fold, "seed": int(config.get("seed", 0)),
                                              "output": str(Path(config["runs"]) / f"{folder}-f{fold}")})
            plan.append((name, options))
    folders = [options.output for _, options in plan]
    clashes = sorted({folder for folder in folders if folders.count(folder) > 1})
    if clashes:  # a second entry would find the first one's finished run and skip its own training
        raise ExperimentError(f"Two model entries share the run folder {clashes[0]}: give each of them its own "
                              f"`name` (a named entry's run folder is named after it).")
    return plan


def shared_training(plan) -> dict:
    """{run folder: the earlier run folder of the same fold it can take its training from}: TreeVAE
    entries whose options differ only in what the final refit reads (`options.REFIT_OPTIONS`, e.g.
    the top-level rule or marker genes) are the same training, so the later ones redo only the
    final refit on the first one's trained model (`refit.refit_run`), to the digit what training
    them would give, in about a minute each."""
    ignored = set(REFIT_OPTIONS) | {"output", "resume", "overwrite"}
    trained, sources = [], {}
    for _, options in plan:
        key = {k: v for k, v in options.to_dict().items() if k not in ignored}
        source = next((output for output, other in trained if other == key), None) if options.model == "tree" else None
        if source is None:
            trained.append((options.output, key))
        else:
            sources[options.output] = source
    return sources


def run_one(options: TrainOptions, iwae_samples: int, log=print, refit_of=None) -> Path:
    """Train (or resume, or skip) one run and make sure it is evaluated with `iwae_samples`; with
    `refit_of` (a finished run of the same training, `shared_training`), redo only its final refit."""
    run = RunDirectory(options.output)
    if run.is_finished() and run.metrics.is_file():
        log(f"{run.path}: finished, skipped.")
    elif refit_of is not None and set(genes_of(options.markers)) <= set(RunDirectory(refit_of).read_config()["genes"]):
        log(f"{run.path}: the training of {refit_of}, the final refit redone ...")
        refit_run(refit_of, run.path, log=log, overwrite=True,
                  **{name: getattr(options, name) for name in REFIT_OPTIONS})
    else:  # marker genes outside the first run's genes are kept besides them: another training
        resume = run.has_checkpoint()
        log(f"{run.path}: {'resuming' if resume else 'training'} ...")
        options.resume, options.overwrite = resume, not resume
        train(options, log=log)
    found = read_evaluation(run.path, "test")
    current = found is not None and (run.evaluation("test") / "latent_leiden.csv").is_file()  # older: no peers
    if not current or found[0]["iwae_samples"] != iwae_samples:
        log(f"{run.path}: evaluating the test cells (IWAE with {iwae_samples} samples) ...")
        write_evaluation(evaluate_run(run.path, subset="test", iwae_samples=iwae_samples))
    return run.path


def level_one_details(runs, names) -> pd.DataFrame:
    """Level 1 (stem vs non-stem) per run: macro F1, the stem class's F1, the model's top split
    (the finest classes that make up each level-1 cluster), and whether the CD34+ cells keep one
    ancestor path (share of them on their most common predicted path above the finest level)."""
    rows = []
    for run in runs:
        config = RunDirectory(run).read_config()
        cells = compare.evaluated_cells(run, "test")
        record = json.loads((RunDirectory(run).evaluation("test") / "level_metrics.json").read_text())
        levels = list(record["levels"])
        first = levels[0]
        per_class = record.get("per_class_f1", {}).get(first, {})
        hierarchy_labels = cells.obs[config["hierarchy"]["label_column"]].astype(str)
        paths = {label: path for label, path in config["hierarchy"]["paths"].items()}
        finest = hierarchy_labels.map(lambda label: paths[label][-1]).to_numpy()
        flat = clustering_of(cells) == "flat"
        top = (cells.obs["scvae_cluster"] if flat else cells.obs[f"scvae_{first}_cluster"]).astype(str).to_numpy()
        split = []
        for cluster in sorted(set(top), key=lambda c: -np.sum(top == c)):
            members = pd.Series(finest[top == cluster]).value_counts(normalize=True)
            split.append(f"{cluster}: " + ", ".join(f"{name} {share:.0%}" for name, share in members.items()
                                                    if share >= 0.1))
        stem_label = next((label for label, path in paths.items() if path[0] == "Stem"), None)
        stem = hierarchy_labels.to_numpy() == stem_label
        if not flat and stem.any():
            ancestors = pd.Series(["/".join(str(cells.obs[f"scvae_{level}_cluster"].iloc[i]) for level in levels[:-1])
                                   for i in np.flatnonzero(stem)])
            same_path = float(ancestors.value_counts(normalize=True).iloc[0])
        else:
            same_path = np.nan
        rows.append({"group": names.get(str(run)) or compare.group_name(config), "run": str(run),
                     "f1_macro": record["levels"][first]["f1_macro"],
                     "f1_stem": per_class.get("Stem", np.nan), "ari": record["levels"][first]["ari"],
                     "stem_cells_on_one_ancestor_path": same_path,
                     "top_split (cluster: finest classes >= 10%)": " | ".join(split)})
    return pd.DataFrame(rows)


def targets_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Each hierarchical model against the targets (issues 5 and 12), and level by level against
    our MixtureVAE, the original scVAE and the peers (scanpy's and its own latent's Leiden)."""
    mean = summary.set_index(["group", "level"])
    groups = [g for g in dict.fromkeys(summary["group"]) if g.startswith(HIERARCHICAL)]
    baselines = [g for g in dict.fromkeys(summary["group"])
                 if g.startswith(("MixtureVAE", "Leiden on")) or g in (compare.SCVAE_GROUP, SCANPY_GROUP)]
    rows = []
    for group in groups:
        row = {"model": group}
        for (level, score), target in TARGETS.items():
            value = mean.loc[(group, level), f"{score}_mean"] if (group, level) in mean.index else np.nan
            row[f"{level} {score} >= {target}"] = f"{value:.3f} {'met' if value >= target else 'not met'}"
        for baseline in baselines:
            levels = [level for (g, level) in mean.index if g == group]
            ahead = [level for level in levels
                     if (baseline, level) in mean.index
                     and mean.loc[(group, level), "ari_mean"] >= mean.loc[(baseline, level), "ari_mean"]]
            row[f"ARI at or above {baseline}"] = f"{len(ahead)}/{len(levels)} levels"
        rows.append(row)
    return pd.DataFrame(rows)


def poster_table(summary: pd.DataFrame, level="level_4") -> pd.DataFrame:
    """Our level-4 means beside the poster's."""
    rows = []
    for _, row in summary[summary["level"] == level].iterrows():
        poster = POSTER.get(row["group"], (np.nan, np.nan, np.nan))
        rows.append({"model": row["group"], "runs": row["n_runs"],
                     "F1 weighted": compare._cell(row["f1_weighted_mean"], row["f1_weighted_ci"]),
                     "poster F1": poster[0],
                     "ARI": compare._cell(row["ari_mean"], row["ari_ci"]), "poster ARI": poster[1],
                     "IWAE": compare._cell(row["iwae_mean"], row["iwae_ci"], 1), "poster IWAE": poster[2]})
    return pd.DataFrame(rows)


def run_experiment(config_path, only_folds=None, log=print) -> Path:
    """Run (or continue) the experiment of `config_path`; returns the results folder."""
    config = read_config(config_path)
    started = time.time()
    plan = planned_runs(config)
    if only_folds is not None:
        plan = [(name, options) for name, options in plan if options.fold in set(only_folds)]
    iwae_samples = int(config.get("iwae_samples", 500))
    sources = shared_training(plan)
    runs, names = [], {}
    for i, (name, options) in enumerate(plan, start=1):
        log(f"[{i}/{len(plan)}] fold {options.fold}: {name or options.model + ' ' + options.prior}")
        path = run_one(options, iwae_samples, log, refit_of=sources.get(options.output))
        keras.backend.clear_session()  # free the finished run's graphs: the process otherwise grew ~0.45 GB a run
        gc.collect()
        runs.append(str(path))
        if name:
            names[str(path)] = name
    results = Path(config["results"])
    scvae = [config["scvae"]] if config.get("scvae") else []
    comparison_report(runs, scvae=scvae, output=results, level=config.get("level"), iwae_samples=iwae_samples,
                      names=names, peers=bool(config.get("peers")), progress=log)
    summary = pd.read_csv(results / "summary.csv")
    level_one = level_one_details(runs, names)
    level_one.to_csv(results / "level_1.csv", index=False)
    targets = targets_table(summary)
    targets.to_csv(results / "targets.csv", index=False)
    poster = poster_table(summary, config.get("level", "level_4"))
    poster.to_csv(results / "poster.csv", index=False)
    wall = time.time() - started
    seconds = {run: json.loads(RunDirectory(run).metrics.read_text()).get("seconds") for run in runs}
    info = {"command": "scvae-hier experiment " + str(config_path), "date": datetime.now(timezone.utc).isoformat(),
            "wall_seconds_this_invocation": round(wall, 1),
            "training_seconds_per_run": seconds, "training_seconds_total": round(sum(filter(None, seconds.values())), 1),
            "python": sys.version.split()[0], "machine": platform.platform(),
            "versions": RunDirectory(runs[0]).read_config()["versions"], "config": config}
    (results / "experiment.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    with open(results / "report.md", "a", encoding="utf-8") as report:
        report.write("\n## Beside the poster (level 4; poster numbers read off its Figure 1)\n\n"
                     + compare.markdown(poster) + "\n\n## Targets (issues 5 and 12)\n\n" + compare.markdown(targets)
                     + "\n\n## Level 1: stem vs non-stem\n\n" + compare.markdown(level_one)
                     + f"\n\nCommand: `{info['command']}`; {info['date']}; training time of all runs "
                       f"{info['training_seconds_total']} s; versions {info['versions']}.\n")
    log(f"Results in {results}")
    return results
