"""`scvae-hier evaluate`: a saved run scored on chosen cells, as a user would after training.

On the cells of one set (the run's own test, validation or training cells, all of them, or
another count file with the model's genes) it computes the ELBO with each of its terms, the
IWAE bound, and per-level clustering scores, and writes them with an AnnData of those cells into
RUN/evaluation/<name>/:
- bounds.json: mean ELBO terms and IWAE, their standard errors, cells, samples, data checksum;
- level_metrics.json / level_metrics.csv: one row per hierarchy level (scvae_hier.metrics), with
  the nesting of the model's clusters and, as a diagnostic, the ARI of Leiden bisected to K_l on
  the model's own latent (`ari_latent_leiden`: when it is well above `ari`, the model's clusters
  lag its latent);
- latent_leiden.csv: every per-level score of that Leiden clustering (scvae_hier.analysis.peers);
- cells.h5ad: the evaluated cells (raw counts of the model's genes in X) with the keys of
  outputs.h5ad (see scvae_hier.outputs), per-cell obs["scvae_elbo"] and obs["scvae_iwae"], and
  uns["scvae_evaluation"] holding bounds and per-level scores.
"""
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import ondisk
from ..bounds import check_genes, elbo_terms, iwae
from ..choices import DEFAULT_IWAE_SAMPLES, EVALUATION_SETS as SETS, check_choice
from ..data import DataError, batch_covariates, file_checksum, prepare, read_counts
from ..files import write_h5ad
from ..hierarchy import Hierarchy
from ..labels import fill_true_leaf_labels
from ..options import TrainOptions
from ..outputs import annotate, level_names, predict_outputs
from ..runs import RunDirectory, load_model, write_json


DIAGNOSTIC_CELLS = 20_000  # the latent-Leiden diagnostic scores a seeded sample of this many cells at most


@dataclass
class Evaluation:
    """What `evaluate_run` computed; `write` puts it on disk."""
    run: RunDirectory
    name: str
    adata: object  # AnnData of the evaluated cells, annotated
    bounds: dict
    levels: pd.DataFrame = None  # per-level scores; None without labels or clusters
    latent_leiden: pd.DataFrame = None  # the same scores of Leiden at K_l on the model's latent
    files: list = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.run.evaluation(self.name)


def _data_path(config: dict, data) -> Path:
    if data is not None:
        return Path(data)
    trained_on = Path(config["options"]["data"])
    for candidate in (trained_on, Path(config.get("data_path") or trained_on)):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"The run was trained on {trained_on}, which is not found from here; "
                            f"pass the count file with --data.")


def load_cells(run: RunDirectory, data=None, subset=None, drop_empty_cells=None):
    """The cells to evaluate, prepared exactly as for training (the model's genes, in its order).

    Returns (prepared AnnData of the chosen cells, hierarchy or None, subset, evaluation name).
    The run's split (test, validation, train cells) applies to the file it was trained on; if that
    file changed since training (checksum), or another file is asked for a set, the set's cells
    are matched by name and refused unless every one of them is there. Another file is evaluated
    as a whole by default."""
    config = run.read_config()
    options = config["options"]
    path = _data_path(config, data)
    same_file = file_checksum(path) == config["data_checksum"]
    own_path = data is None or Path(data).resolve() == Path(options["data"]).resolve()
    if subset is None:
        subset = "test" if same_file or own_path else "all"
    check_choice("set", subset, SETS)

    on_disk = ondisk.use_out_of_core(path, options.get("out_of_core", "auto"), options.get("layer"))
    adata = ondisk.read(path, options.get("layer")) if on_disk else read_counts(path, layer=options.get("layer"))
    hierarchy = Hierarchy.from_dict(config["hierarchy"]) if config.get("hierarchy") else None
    has_labels = hierarchy is not None and hierarchy.label_column in adata.obs
    exclude_cells = None
    if (has_labels and options.get("semi_supervised") and options.get("exclude_labels")
            and all(level in adata.obs for level in options.get("levels") or ())):
        from ..training import only_excluded_leaves, resolve_hierarchy  # the cells training left out with them
        trained = TrainOptions.from_dict(options)
        exclude_cells = only_excluded_leaves(adata.obs, resolve_hierarchy(adata, trained), trained)
    settings = dict(genes=config["genes"], label_column=hierarchy.label_column if has_labels else None,
                    exclude_labels=list(options.get("exclude_labels") or ()) if has_labels else (),
                    exclude_cells=exclude_cells,
                    drop_empty_cells=options.get("drop_empty_cells", False) if drop_empty_cells is None
                    else drop_empty_cells, outlier_counts=options.get("outlier_counts", "keep"))
    prepared = _prepare_on_disk(adata, settings, run, subset) if on_disk else prepare(adata, **settings)
    check_genes(config["genes"], prepared.var_names)
    split = pd.read_csv(run.split, dtype=str).set_index("cell")["set"]
    if same_file:
        missing = prepared.obs_names.difference(split.index)
        if len(missing):
            raise DataError(f"{len(missing)} cells of {path} are not in the run's split (e.g. {list(missing[:3])}).")
    elif subset != "all":
        wanted = split.index[split == subset]
        absent = wanted.difference(prepared.obs_names)
        if len(absent):
            change = "changed since the run was trained on it" if own_path else "is not the file the run was trained on"
            raise DataError(f"{path} {change} (its checksum differs), and {len(absent)} of the run's {len(wanted)} "
                            f"{subset} cells are not in it by name (e.g. {list(absent[:3])}), so its {subset} cells "
                            f"cannot be told apart from cells the model trained on. Evaluate the original file, or "
                            f"this one as a whole with --set all (training cells included).")
        print(f"Note: {path} differs from the file the run was trained on; its {len(wanted)} {subset} cells were "
              f"matched by name.")
        prepared = prepared[prepared.obs_names.isin(split.index)].copy()
    if same_file or subset != "all":
        prepared.obs["split"] = pd.Categorical(split.loc[prepared.obs_names].to_numpy(),
                                               categories=["train", "validation", "test"])
        if subset != "all":
            prepared = prepared[prepared.obs["split"] == subset].copy()
    if prepared.n_obs == 0:
        raise DataError(f"The run has no {subset} cells to evaluate; choose another --set.")
    if has_labels:  # a run trained on labels with holes: cells without a leaf label have no truth to score
        scored = fill_true_leaf_labels(prepared.obs, hierarchy, options)
        prepared.obs["scvae_scored"] = scored
        labels = prepared.obs[hierarchy.label_column].astype(str).to_numpy()[scored]
        hierarchy.validate(labels)
        hierarchy = hierarchy.restrict(labels) if scored.sum() > 1 else None
    else:
        hierarchy = None
    name = subset if same_file or subset != "all" else f"{path.name.split('.')[0]}-{subset}"
    return prepared, hierarchy, subset, name


def _prepare_on_disk(source, settings, run: RunDirectory, subset: str):
    """Out of core (the run's --out-of-core): the file prepared in chunks into a temporary store,
    then only the evaluated set's counts held in memory (the test set: a tenth of the cells)."""
    split = pd.read_csv(run.split, dtype=str).set_index("cell")["set"]
    with tempfile.TemporaryDirectory(prefix="tmp-counts-", dir=run.path) as store:
        disk = ondisk.prepare(source, Path(store) / "counts", **settings)
        keep = np.ones(disk.n_obs, bool) if subset == "all" else disk.obs_names.isin(split.index[split == subset])
        return disk.to_anndata(keep)


def _mean_and_error(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    error = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else float("nan")
    return {"mean": float(values.mean()), "standard_error": float(error)}


def level_table(hierarchy, labels, clusters_by_level, flat: bool, parents=None) -> pd.DataFrame:
    """Per-level scores, with each level's per-class F1 in attrs (level 1's stem class, say), and
    `nesting` (metrics.nesting: in the model's own tree `parents` if it has one; NaN for a flat
    model, whose one clustering is scored at every level)."""
    from ..metrics import hungarian_f1, level_scores, nesting

    table = level_scores(hierarchy, labels, clusters_by_level[0] if flat else clusters_by_level)
    table["nesting"] = np.nan if flat else nesting(clusters_by_level, parents)
    truth = hierarchy.level_labels(labels)
    table.attrs["per_class_f1"] = {level: hungarian_f1(truth[:, i], clusters_by_level[i])["per_class"]
                                   for i, level in enumerate(hierarchy.levels)}
    return table


def evaluate_run(run_path, data=None, subset=None, iwae_samples=DEFAULT_IWAE_SAMPLES, batch_size=256, seed=0,
                 drop_empty_cells=None, progress=None) -> Evaluation:
    """Bounds and per-level scores of a run on one set of cells (see the module docstring)."""
    if int(iwae_samples) < 1 or int(batch_size) < 1:
        raise ValueError(f"--iwae-samples and --batch-size must be at least 1; got {iwae_samples} and {batch_size}.")
    run = RunDirectory(run_path)
    config = run.read_config()
    prepared, hierarchy, subset, name = load_cells(run, data, subset, drop_empty_cells)
    model = load_model(run.path)
    started = time.time()
    X = prepared.X
    covariates, _ = batch_covariates(prepared.obs, config["options"].get("batch_key"),
                                     config["model_arguments"].get("covariates"))
    terms = elbo_terms(model, X, batch_size=batch_size, covariates=covariates)
    per_cell_iwae = iwae(model, X, n_samples=iwae_samples, batch_size=batch_size, seed=seed, progress=progress,
                         covariates=covariates)
    outputs = predict_outputs(model, X, config.get("predict_batch_size", 1024), covariates)
    adata = prepared
    clusters_by_level = annotate(adata, outputs, level_names(hierarchy, outputs), model)
    adata.obs["scvae_elbo"] = terms["elbo"]
    adata.obs["scvae_iwae"] = per_cell_iwae

    bounds = {"model": type(model).__name__, "set": subset, "n_cells": int(adata.n_obs),
              "data": str(data if data is not None else config["options"]["data"]),
              "iwae_samples": int(iwae_samples), "iwae_seed": int(seed),
              "iwae": _mean_and_error(per_cell_iwae),
              "terms": {term: _mean_and_error(values) for term, values in terms.items()},
              "seconds": round(time.time() - started, 1)}
    levels = latent_leiden = None
    if hierarchy is not None and clusters_by_level:
        scored = adata.obs["scvae_scored"].to_numpy(bool)
        labels = adata.obs[hierarchy.label_column].astype(str).to_numpy()[scored]
        levels = level_table(hierarchy, labels, [c[scored] for c in clusters_by_level],
                             flat=model.clustering == "flat", parents=getattr(model, "parents", None))
        from .peers import leiden_table
        latent_leiden = leiden_table(hierarchy, labels, adata.obsm["X_scvae"][scored], seed=seed,
                                     max_cells=DIAGNOSTIC_CELLS)
        bounds["n_scored"] = int(scored.sum())
        if run.labels.is_file():  # cells the model was trained on the labels of
            given = pd.read_csv(run.labels, index_col="cell", dtype=str, keep_default_na=False)
            labelled = given.index[(given != "").any(axis=1)]
            bounds["n_scored_labelled"] = int(adata.obs_names[scored].isin(labelled).sum())
        levels["ari_latent_leiden"] = latent_leiden["ari"]
    adata.uns["scvae"] = {"model": type(model).__name__, "clustering": model.clustering}
    adata.uns["scvae_evaluation"] = {
        "bounds": {"iwae": bounds["iwae"]["mean"], "iwae_samples": bounds["iwae_samples"],
                   **{term: value["mean"] for term, value in bounds["terms"].items()}},
        "set": subset, "n_cells": bounds["n_cells"]}
    if levels is not None:
        adata.uns["scvae_evaluation"]["levels"] = {level: {k: v for k, v in row.items()}
                                                   for level, row in levels.to_dict(orient="index").items()}
        if levels.attrs.get("hierarchy_consistency") is not None:
            adata.uns["scvae_evaluation"]["hierarchy_consistency"] = levels.attrs["hierarchy_consistency"]
    return Evaluation(run=run, name=name, adata=adata, bounds=bounds, levels=levels, latent_leiden=latent_leiden)


def write_evaluation(evaluation: Evaluation) -> list:
    """Write bounds.json, level_metrics.{json,csv} and cells.h5ad; return their paths."""
    from ..metrics import write_scores

    folder = evaluation.folder
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "bounds.json", evaluation.bounds)
    files = [folder / "bounds.json"]
    if evaluation.levels is not None:
        files.extend(write_scores(evaluation.levels, folder, "level_metrics"))
    if evaluation.latent_leiden is not None:
        evaluation.latent_leiden.to_csv(folder / "latent_leiden.csv", index_label="level")
        files.append(folder / "latent_leiden.csv")
    write_h5ad(evaluation.adata, folder / "cells.h5ad")
    files.append(folder / "cells.h5ad")
    evaluation.files = files
    return files


def read_evaluation(run_path, name="test"):
    """(bounds dict, per-level DataFrame or None) written by a previous evaluation, or None."""
    folder = RunDirectory(run_path).evaluation(name)
    if not (folder / "bounds.json").is_file():
        return None
    import json
    bounds = json.loads((folder / "bounds.json").read_text())
    csv = folder / "level_metrics.csv"
    levels = pd.read_csv(csv, index_col="level") if csv.is_file() else None
    if levels is not None:
        levels.attrs.update(json.loads((folder / "level_metrics.json").read_text()))
        levels.attrs.pop("levels", None)
    return bounds, levels


COLUMNS = {"n_classes": "classes", "n_clusters_used": "clusters", "ari": "ARI", "nmi": "NMI", "ami": "AMI",
           "f1_weighted": "F1 w", "f1_macro": "F1 m", "accuracy_hungarian": "acc H", "accuracy_majority": "acc maj",
           "nesting": "nested", "ari_latent_leiden": "ARI Leiden(z)"}


def scored_note(bounds) -> str:
    """The sentence that says which cells the per-level scores are on, when that is not simply all
    the evaluated cells (labels with holes, or cells whose labels the model was trained on); else ""."""
    scored, given = bounds.get("n_scored", bounds["n_cells"]), bounds.get("n_scored_labelled", 0)
    if scored == bounds["n_cells"] and not given:
        return ""
    return (f"Scored on the {scored} of these cells with a true label"
            + (f", {given} of them given it in training (the model was trained on it, so for them the scores show "
               f"the fit to the labels, not a prediction)" if given else "") + ".")


def format_evaluation(evaluation: Evaluation) -> str:
    """The text `scvae-hier evaluate` prints."""
    b = evaluation.bounds
    terms = b["terms"]
    lines = [f"{b['model']} on {b['n_cells']} {b['set']} cells of {b['data']} ({b['seconds']} s)",
             f"  ELBO        {terms['elbo']['mean']:10.2f} +- {terms['elbo']['standard_error']:.2f} nats per cell",
             f"  IWAE ({b['iwae_samples']:>3}) {b['iwae']['mean']:10.2f} +- {b['iwae']['standard_error']:.2f} "
             f"({b['iwae']['mean'] - terms['elbo']['mean']:+.2f} over the ELBO)"]
    for term, value in terms.items():
        if term not in ("elbo", "loss"):
            lines.append(f"    {term:<20} {value['mean']:10.3f}")
    if evaluation.levels is None:
        lines.append("No per-level scores: the data has no labels of the run's hierarchy, or the model no clusters.")
    else:
        table = evaluation.levels[[c for c in COLUMNS if c in evaluation.levels]].rename(columns=COLUMNS)
        note = scored_note(b)
        if note:
            lines.append(note)
        lines.append("Per-level clustering (the model's own: argmax q(y_l|x), or its nested path rule for TreeVAE and "
                     "semi-supervised models; Hungarian matching, unmatched clusters count as wrong):")
        lines.append(table.to_string(float_format=lambda v: f"{v:.3f}"))
        consistency = evaluation.levels.attrs.get("hierarchy_consistency")
        if consistency is not None:
            lines.append(f"Hierarchy consistency (cells whose mapped labels form a path): {consistency:.3f}")
        lines.append("nested: share of cells whose cluster lies under their cluster at the level above (the model's "
                     "tree, or the majority parent). ARI Leiden(z), a diagnostic: Leiden bisected to each level's "
                     "class count on the model's latent of these cells; well above ARI, the clusters lag the latent.")
    return "\n".join(lines)
