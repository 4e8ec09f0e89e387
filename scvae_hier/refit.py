"""`scvae-hier refit RUN --output NEW`: redo a trained TreeVAE's final prior refit with other
settings, without training again.

TreeVAE's final refit (after the best weights are back) re-seeds the prior from a tree-shaped
clustering of the training cells' latent and runs EM steps on it; it reads the trained encoder and
the cells, nothing the refit itself left behind. So the top-level rule, marker genes, empty leaves
or the grouping weights can be changed on a finished run in about a minute, and the new run is
exactly what training with those settings would have written (the same training, the same seed).
The new folder is a complete run (model, outputs, split, history); its config names the run it
came from.
"""
import json
import shutil
import time
from pathlib import Path

from .data import CountBatches, DataError, file_checksum, read_counts
from .markers import genes_of
from .models.tree import TreeReseeding
from .options import REFIT_OPTIONS, TrainOptions
from .runs import RunDirectory, load_model
from .training import (check_empty_leaves, check_folder, finish_run, make_folder, model_arguments, prepare_cells,
                       read_split, resolve_hierarchy, write_run_start)


def refit_options(saved_options: dict, changes: dict) -> TrainOptions:
    """The source run's options with `changes` (refit options only) applied, checked."""
    unknown = sorted(set(changes) - set(REFIT_OPTIONS))
    if unknown:
        raise ValueError(f"{unknown} change training, not only the final refit; refit changes only "
                         f"{list(REFIT_OPTIONS)}. Train a new run for the others.")
    if saved_options.get("model") != "tree":
        raise ValueError(f"refit redoes TreeVAE's final prior refit; this run is --model {saved_options.get('model')}.")
    options = TrainOptions.from_dict({**saved_options, **changes})
    if int(options.final_refit) < 1:
        raise ValueError(f"--final-refit {options.final_refit}: a refit needs at least 1 EM step.")
    return options


def refit_run(source, output, log=print, overwrite=False, **changes) -> Path:
    """Write the run `output`: the run `source` with its final refit redone under `changes`
    (TrainOptions names from REFIT_OPTIONS, e.g. top_level_split="compact"). An existing run in
    `output` is replaced only with `overwrite`. Returns the folder."""
    started = time.time()
    source = RunDirectory(source)
    saved = source.read_config()
    if not source.is_finished():
        raise FileNotFoundError(f"{source.path} holds no finished run (no model.keras or outputs.h5ad); finish its "
                                f"training first (`scvae-hier train DATA --output {source.path} --resume`).")
    if json.loads(source.metrics.read_text()).get("out_of_core"):
        raise ValueError(f"{source.path} was trained out of core; refit reads the counts into memory and does not "
                         f"handle such runs yet. Train a new run with the refit settings instead.")
    options = refit_options(saved["options"], changes)
    options.output, options.resume, options.overwrite = str(output), False, bool(overwrite)
    run = RunDirectory(output)
    if run.path.resolve() == source.path.resolve():
        raise FileExistsError("refit writes a new run folder; give an --output other than the source run.")
    check_folder(run, options)
    missing = [g for g in genes_of(options.markers) if g not in set(saved["genes"])]
    if missing:
        raise DataError(f"marker gene(s) {missing} are not among the {len(saved['genes'])} genes {source.path} was "
                        f"trained on (markers given at training are kept besides the variable genes); train a new "
                        f"run with these --markers instead.")
    adata = read_counts(options.data, layer=options.layer)
    if file_checksum(options.data) != saved["data_checksum"]:
        raise DataError(f"{options.data} is not the file {source.path} was trained on (checksum differs); refit needs "
                        f"the original data.")
    cells = prepare_cells(adata, options, resolve_hierarchy(adata, options), genes=saved["genes"])
    del adata
    prepared = cells.adata
    split = read_split(source, prepared.obs_names)
    model = load_model(source.path)
    arguments = model_arguments(options, prepared.n_vars, cells.model_hierarchy, cells.categories,
                                prepared.var_names)
    model.configure_final_refit(**{name: arguments[name] for name in REFIT_OPTIONS if name in arguments})
    check_empty_leaves(model, cells)

    train = split == "train"
    batches = CountBatches(prepared.X[train], covariates=None if cells.covariates is None else cells.covariates[train],
                           labels=None if cells.labels is None else cells.labels[train])
    log(f"Refitting the prior of {source.path} ({int(train.sum())} training cells) into {run.path} ...")
    model.final_prior_refit(TreeReseeding(batches.X, batches.covariates, epochs=(), labels=batches.labels))

    make_folder(run, log)
    write_run_start(run, cells, split, {**saved, "options": options.to_dict(), "model_arguments": arguments,
                                        "refit_of": str(source.path)})
    if source.history.exists():
        shutil.copyfile(source.history, run.history)
    trained = json.loads(source.metrics.read_text())
    finish_run(run, model, cells, split, started, refit_of=str(source.path), training_seconds=trained.get("seconds"),
               **{key: trained[key] for key in ("best_epoch", "epochs_run") if key in trained})
    return run.path
