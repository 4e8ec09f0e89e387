"""Training: KL warm-up, resumable early stopping and checkpoints, and the `train` pipeline that
turns options into a finished run folder."""
from . import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from . import ondisk
from .data import (CountBatches, DataError, batch_covariates, file_checksum, fold_cells, prepare, read_counts,
                   split_cells)
from .files import atomic_path, write_csv
from .hierarchy import Hierarchy
from .labels import allowed_leaves, implied_leaves, label_codes, parse_reveal, reveal
from .markers import genes_of, resolve as resolve_markers
from .initialisation import initialise_prior
from .models import model_class
from .tree_clustering import stranded_by_empty_leaves
from .options import TrainOptions
from .runs import RunDirectory, load_checkpoint, save_model_atomically, save_weights_atomically, write_json
from .metrics import cluster_names
from .calibration import applies, fit_model_temperature
from .novelty import record_novelty_reference
from .outputs import PREDICT_BATCH_SIZE, predict_outputs, write_outputs


class KLWarmUp(keras.callbacks.Callback):
    """KL weight beta = min(epoch / W, 1), as scVAE (epoch counted from 0)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = int(epochs)

    def on_epoch_begin(self, epoch, logs=None):
        weight = 1.0 if self.epochs <= 0 else min(epoch / self.epochs, 1.0)
        self.model.kl_weight.assign(weight)


class MarginalUsageSchedule(keras.callbacks.Callback):
    """lambda(t): constant for the first half of training, then cosine-annealed to 10% of its start."""

    def __init__(self, start: float, epochs: int):
        super().__init__()
        self.start, self.epochs = float(start), int(epochs)

    def weight(self, epoch: int) -> float:
        half = self.epochs / 2
        if epoch < half:
            return self.start
        progress = min((epoch - half) / max(half, 1), 1.0)
        return self.start * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def on_epoch_begin(self, epoch, logs=None):
        if hasattr(self.model, "usage_weight"):
            self.model.usage_weight.assign(self.weight(epoch))


class TrainingState(keras.callbacks.Callback):
    """Early stopping on the (beta-free) ELBO, with the best weights restored at the end.

    With a run folder it writes, after every epoch, the model with its optimizer state, the best
    weights so far, the history and the early-stopping counters, so `--resume` continues exactly
    where it stopped; without one (the Python API) it keeps the best weights in memory.
    Epochs before the end of warm-up never count as best: their loss is not the full objective.
    """

    def __init__(self, run, monitor: str, patience: int, first_epoch: int, state=None, log=print):
        super().__init__()
        self.run, self.monitor, self.patience, self.first_epoch = run, monitor, int(patience), int(first_epoch)
        self.state = state or {"epoch": -1, "best": None, "best_epoch": None, "wait": 0, "history": []}
        self.log = log
        self.best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if not math.isfinite(logs.get("loss", 0.0)):
            raise ValueError(f"Training diverged in epoch {epoch + 1} (loss {logs['loss']}); the run is not saved as "
                             f"finished. Lower --learning-rate (now {float(self.model.optimizer.learning_rate.numpy()):g}) "
                             f"or check the counts for outliers.")
        self.state["history"].append({"epoch": epoch, "kl_weight": float(self.model.kl_weight.numpy()), **logs})
        if epoch >= self.first_epoch:
            value = logs[self.monitor]
            if self.state["best"] is None or value > self.state["best"]:
                self.state.update(best=value, best_epoch=epoch, wait=0)
                if self.run is None:
                    self.best_weights = self.model.get_weights()
                else:
                    save_weights_atomically(self.model, self.run.checkpoint_best)
            else:
                self.state["wait"] += 1
        self.state["epoch"] = epoch
        if self.run is not None:
            write_history(self.run.history, self.state["history"])
            save_model_atomically(self.model, self.run.checkpoint_model)
            write_json(self.run.checkpoint_state, self.state)
        if self.state["wait"] >= self.patience:
            self.log(f"Early stopping: {self.monitor} has not improved for {self.patience} epochs "
                     f"(best {self.state['best']:.3f} at epoch {self.state['best_epoch'] + 1}).")
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.restore_best()

    def restore_best(self):
        if self.state["best_epoch"] is None:
            return
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
        elif self.run is not None and self.run.checkpoint_best.exists():
            self.model.load_weights(self.run.checkpoint_best)


def write_history(path, rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------- pipeline
def default_run_path(options: TrainOptions) -> Path:
    stem = Path(options.data).name.split(".")[0]
    prior = "" if options.model == "vae" else f"-{options.prior}"
    fold = f"-f{options.fold}" if options.folds else ""
    return Path("runs") / f"{stem}-{options.model}{prior}-s{options.seed}{fold}"


def resolve_hierarchy(adata, options: TrainOptions):
    """The hierarchy to evaluate against: a file, per-level columns, the data's own, or a label column."""
    if options.hierarchy and options.levels:
        raise DataError("Give the hierarchy either as a file (--hierarchy) or as per-level obs columns (--levels), "
                        "not both.")
    if options.hierarchy:
        hierarchy = Hierarchy.from_file(options.hierarchy)
    elif options.levels:
        hierarchy = Hierarchy.from_obs(adata.obs, list(options.levels), options.label_column,
                                       partial=semi_supervised(options), unlabelled_category=options.unlabelled_category)
    elif "hierarchy" in adata.uns:
        hierarchy = Hierarchy.from_anndata(adata)
    elif options.label_column:
        column = options.label_column
        if column not in adata.obs:
            raise DataError(f"Label column {column!r} is not in the data; obs has {sorted(adata.obs.columns)}.")
        hierarchy = Hierarchy.from_obs(adata.obs, [column])
    else:
        return None
    if options.label_column and options.label_column != hierarchy.label_column:
        # The hierarchy's paths apply to the labels of another column (e.g. a renamed column).
        hierarchy = Hierarchy(options.label_column, hierarchy.levels, hierarchy.paths)
    if hierarchy.label_column not in adata.obs:
        raise DataError(f"The hierarchy maps labels of obs column {hierarchy.label_column!r}, which the data lacks; "
                        f"obs has {sorted(adata.obs.columns)}. Pass --label-column or a matching --hierarchy.")
    return hierarchy


def semi_supervised(options: TrainOptions) -> bool:
    return bool(options.semi_supervised)


def model_arguments(options: TrainOptions, n_genes: int, hierarchy, covariates=(), genes=None) -> dict:
    """The model's constructor arguments from the options; marker genes (`--markers`) are resolved to
    the hierarchy's classes and the model's gene columns (`genes`, its gene names)."""
    arguments = dict(n_genes=n_genes, latent_dim=options.latent_dim, hidden=list(options.hidden),
                     likelihood=options.likelihood, normalisation=options.normalisation,
                     input_transform=options.input_transform, library_size=options.library_size,
                     dispersion=options.dispersion, covariates=list(covariates),
                     encode_covariates=options.encode_covariates, seed=options.seed)
    try:
        arguments.update(model_class(options.model).arguments_from(options, hierarchy))
    except ValueError as error:
        raise DataError(str(error)) from None
    if options.markers:
        arguments["markers"] = resolve_markers(options.markers, hierarchy, list(genes))
    return arguments


RUN_FILES = {"model.keras", "config.json", "history.csv", "split.csv", "labels.csv", "outputs.h5ad", "metrics.json", "report.md",
             "checkpoint", "evaluation", "figures", ".scvae-hier-run", "counts"}


def check_folder(run: RunDirectory, options: TrainOptions):
    """Decide between a fresh run, a resumed one, or a clear refusal, before anything is read or
    written; returns the saved config of a resumed run, or None. Nothing is deleted here."""
    if options.resume:
        if not run.config.exists():
            raise FileNotFoundError(f"Nothing to resume in {run.path}: no config.json. Start a new run instead.")
        return run.read_config()
    if run.path.exists() and not run.path.is_dir():
        raise FileExistsError(f"--output {run.path} is a file, not a folder; choose another --output.")
    if run.path.exists() and any(run.path.iterdir()):
        if not run.is_ours():
            raise FileExistsError(f"--output {run.path} is a folder that is not a scvae-hier run (no "
                                  f"{run.marker.name} marker or run config), so it is never deleted, --overwrite or "
                                  f"not; choose another --output.")
        if not options.overwrite:
            if run.is_finished():
                hint = "it holds a finished run"
            elif run.has_checkpoint():
                hint = "it holds an interrupted run: add --resume to continue it"
            else:
                hint = "it holds a run that never finished an epoch"
            raise FileExistsError(f"Run folder {run.path} exists and {hint}, --overwrite to replace it, "
                                  f"or --output to choose another folder.")
        foreign = sorted(p.name for p in run.path.iterdir() if p.name not in RUN_FILES and not p.name.startswith("tmp-"))
        if foreign:
            raise FileExistsError(f"Run folder {run.path} also holds files a run does not write ({', '.join(foreign[:5])}"
                                  f"{' ...' if len(foreign) > 5 else ''}); --overwrite would delete them. Move them out "
                                  f"first, or choose another --output.")
    return None


def make_folder(run: RunDirectory, log=print) -> None:
    """Create the run folder (replacing an old run of ours, checked by `check_folder`), once the
    input has passed every check, so a refused input leaves nothing behind."""
    if run.path.exists() and any(run.path.iterdir()):
        log(f"Replacing the run in {run.path} (--overwrite).")
        shutil.rmtree(run.path)
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run.marker.write_text("A scvae-hier run folder: `scvae-hier train --overwrite` may replace it.\n")


# Options that a resumed run may change: they extend or shorten training without changing what
# was being trained. Anything else would make the resumed run a different run.
RESUMABLE = ("epochs", "patience", "xla", "out_of_core")
NOT_COMPARED = ("resume", "overwrite", "output", "data")


def resumed_options(saved: dict, options: TrainOptions, given=None, log=print) -> TrainOptions:
    """The saved run's options with the allowed changes applied (and recorded in config.json's
    "resumed_with"); any other option given with a different value is refused by name.

    `given`: the option names the user typed (the command line knows them); from Python, every
    option that differs from its default counts as given."""
    defaults = TrainOptions()
    if given is None:
        given = {f.name for f in fields(TrainOptions) if getattr(options, f.name) != getattr(defaults, f.name)}
    kept = TrainOptions.from_dict(saved["options"])
    changes, refused = {}, []
    for name in sorted(set(given) - set(NOT_COMPARED)):
        new, old = getattr(options, name), getattr(kept, name)
        if _same(new, old):
            continue
        if name in RESUMABLE:
            changes[name] = new
        else:
            refused.append(f"--{name.replace('_', '-')} {_shown(new)} (the run has {_shown(old)})")
    if refused:
        raise ValueError(f"--resume continues the run as it was started; these options differ: {'; '.join(refused)}. "
                         f"Leave them out to resume, or start a new run with another --output. Only "
                         f"{', '.join('--' + n for n in RESUMABLE)} may change when resuming.")
    if changes:
        log("Resuming with " + ", ".join(f"--{n} {_shown(v)}" for n, v in changes.items()) + ".")
    return TrainOptions.from_dict({**saved["options"], **changes, "resume": True, "output": options.output})


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return a is not None and b is not None and list(a) == list(b) or (a is None and b is None)
    return a == b


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


@dataclass
class Cells:
    """The modelled cells: checked counts of the model's genes (CSR, in `adata.X`), their obs, the
    hierarchy restricted to their labels, and one-hot batch covariates with their categories.
    Semi-supervised: `labels` [n, L] (class codes of `model_hierarchy`, -1 unlabelled) and the
    hierarchy the model is built on (without --hide-labels' classes; else `hierarchy`)."""
    adata: object
    hierarchy: object = None
    covariates: np.ndarray = None
    categories: list = field(default_factory=list)
    labels: np.ndarray = None
    model_hierarchy: object = None

    def __post_init__(self):
        if self.model_hierarchy is None:
            self.model_hierarchy = self.hierarchy


def prepare_cells(adata, options: TrainOptions, hierarchy, genes=None, store=None) -> Cells:
    """Check and subset `adata` (counts in X) as the options say: the shared first step of the
    command line and the Python API. An out-of-core file (`ondisk.read`) is prepared in chunks,
    its chosen counts written to the folder `store`."""
    label_column = hierarchy.label_column if hierarchy else None
    prepare_counts = prepare
    if getattr(adata, "on_disk", False):
        prepare_counts = lambda *args, **kwargs: ondisk.prepare(*args, store=store, **kwargs)  # noqa: E731
    under_excluded = None
    if hierarchy is not None and semi_supervised(options) and options.exclude_labels:
        under_excluded = only_excluded_leaves(adata.obs, hierarchy, options)
    prepared = prepare_counts(adata, n_genes=options.n_genes, genes=genes, label_column=label_column,
                       exclude_labels=list(options.exclude_labels), drop_empty_cells=options.drop_empty_cells,
                       outlier_counts=options.outlier_counts, keep_genes=genes_of(options.markers),
                       exclude_cells=under_excluded)
    covariates, categories = batch_covariates(prepared.obs, options.batch_key)
    if hierarchy is not None and semi_supervised(options):
        return _labelled_cells(prepared, options, hierarchy, covariates, categories)
    if hierarchy is not None:
        labels = prepared.obs[label_column].astype(str).to_numpy()
        hierarchy.validate(labels)
        hierarchy = hierarchy.restrict(labels)
    return Cells(prepared, hierarchy, covariates, categories)


def _allowed_leaves(obs, hierarchy, options: TrainOptions):
    """(codes [n, L], allowed [n, n_leaves]): each cell's labels, and the leaves they leave open."""
    codes = label_codes(obs, hierarchy, list(options.levels) if options.levels else None, options.unlabelled_category)
    return codes, allowed_leaves(codes, hierarchy)


def only_excluded_leaves(obs, hierarchy, options: TrainOptions) -> np.ndarray:
    """[n] bool: labelled cells whose labels leave open only excluded leaves (--exclude-labels), such
    as cells labelled "Monocyte" at level 2 and nothing below when its one leaf is excluded: they are
    left out with the cells of the excluded labels."""
    codes, allowed = _allowed_leaves(obs, hierarchy, options)
    excluded = np.isin(list(hierarchy.paths), [str(label) for label in options.exclude_labels])
    return (codes >= 0).any(axis=1) & ~(allowed & ~excluded).any(axis=1)


def _labelled_cells(prepared, options: TrainOptions, hierarchy, covariates, categories) -> Cells:
    """Cells with partial labels: the given labels (with holes), or for experiments the true labels
    hidden as --labelled and --hide-labels say. The hierarchy keeps the leaves some cell's labels
    name (its leaf label, or a labelled class with one leaf below it), less the hidden labels'
    classes for the model."""
    obs = prepared.obs
    column = hierarchy.label_column
    truth = obs[column].astype(object).where(obs[column].notna(), "nan").astype(str).to_numpy()
    _, allowed = _allowed_leaves(obs, hierarchy, options)
    named = allowed[allowed.sum(axis=1) == 1].any(axis=0)  # the one leaf some cell's labels leave open
    if named.any():  # leaves no cell is labelled with (e.g. all excluded) are not classes here
        hierarchy = hierarchy.restrict(np.array(list(hierarchy.paths))[named])
    hidden = [str(label) for label in options.hide_labels]
    unknown = sorted(set(hidden) - set(hierarchy.paths))
    if unknown:
        raise DataError(f"--hide-labels {unknown} are not labels of the hierarchy's column {column!r}; its labels are "
                        f"{list(hierarchy.paths)}.")
    model_hierarchy = hierarchy
    if hidden:
        model_hierarchy = Hierarchy(column, hierarchy.levels, {k: v for k, v in hierarchy.paths.items()
                                                              if k not in hidden})
        obs = obs.copy()
        for name in dict.fromkeys([column, *(options.levels or ())]):
            obs[name] = obs[name].astype(object).where(~np.isin(truth, hidden), np.nan)
    codes = label_codes(obs, model_hierarchy, list(options.levels) if options.levels else None,
                        options.unlabelled_category)
    if options.labelled:
        codes = reveal(codes, parse_reveal(options.labelled, model_hierarchy), truth, options.seed)
    if not (codes >= 0).any():
        raise DataError("Semi-supervised training, but no cell has a label at any level; label some cells, or "
                        "train without --semi-supervised.")
    return Cells(prepared, hierarchy, covariates, categories, labels=codes, model_hierarchy=model_hierarchy)


def leaf_truth(cells: Cells):
    """[n] the leaf label each cell is scored against: its label column, or where that has none, the
    one leaf its given per-level labels leave open (`labels.implied_leaves`); None without labels."""
    if cells.hierarchy is None:
        return None
    labels = cells.adata.obs[cells.hierarchy.label_column].astype(str).to_numpy().astype(object)
    if cells.labels is not None:
        missing = ~np.isin(labels, list(cells.hierarchy.paths))
        labels[missing] = implied_leaves(cells.labels[missing], cells.model_hierarchy)
    return labels


def labels_table(cells: Cells) -> pd.DataFrame:
    """The labels the model was given, by name (empty: unlabelled), one column per level."""
    tree = cells.model_hierarchy
    return pd.DataFrame({level: np.where(cells.labels[:, i] >= 0,
                                         np.array(tree.classes(i), dtype=object)[np.maximum(cells.labels[:, i], 0)], "")
                         for i, level in enumerate(tree.levels)}, index=cells.adata.obs_names)


def make_split(cells: Cells, options: TrainOptions) -> np.ndarray:
    n = cells.adata.n_obs
    if options.folds:
        labels = (cells.adata.obs[cells.hierarchy.label_column].to_numpy() if cells.hierarchy is not None
                  else None)
        return fold_cells(n, options.folds, options.fold, options.split[1], options.seed, labels)
    return split_cells(n, tuple(options.split), options.seed)


MIN_CELLS_PER_COMPONENT = 3   # training cells per mixture component (fewer: components fit single cells)
MIN_EVALUATION_CELLS = 10     # validation / test cells: scores of a handful of cells mean nothing


def check_enough_cells(model, split, options: TrainOptions) -> None:
    """Refuse splits too small to train or to score on, with the numbers and the fix."""
    counts = {s: int((split == s).sum()) for s in ("train", "validation", "test")}
    components = max(list(model.prior_sizes()) or [1])
    needed = max(MIN_EVALUATION_CELLS, MIN_CELLS_PER_COMPONENT * components)
    if counts["train"] < needed:
        what = f"{components} mixture components" if components > 1 else "a model"
        raise DataError(f"{counts['train']} training cells are too few for {what}: at least {needed} are needed "
                        f"({MIN_CELLS_PER_COMPONENT} per component, {MIN_EVALUATION_CELLS} in all). Use more cells"
                        + (", or fewer components (--n-components / --level-sizes)." if components > 1 else "."))
    planned = {"validation": options.split[1] > 0 or bool(options.folds), "test": options.split[2] > 0 or bool(options.folds)}
    for subset in ("validation", "test"):
        if planned[subset] and counts[subset] < MIN_EVALUATION_CELLS:
            raise DataError(f"The split leaves {counts[subset]} {subset} cell(s) of {len(split)}; at least "
                            f"{MIN_EVALUATION_CELLS} are needed for {'early stopping' if subset == 'validation' else 'test scores'} "
                            f"to mean anything. Use more cells, a larger {subset} fraction (--split), or a fraction "
                            f"of 0 to go without {subset} cells.")


def model_metadata(cells: Cells, options: TrainOptions) -> dict:
    """What applying the model to new data needs, saved inside the model file: genes in order,
    the hierarchy with its class order, the batch covariate and its categories (with cell counts),
    the counts' layer, and the spread of log library sizes (for sampling new cells)."""
    library = np.log(np.maximum(np.asarray(cells.adata.X.sum(axis=1)).ravel(), 1.0))
    batch_counts = {}
    if cells.covariates is not None:
        batch_counts = dict(zip(cells.categories, cells.covariates.sum(axis=0).astype(int).tolist()))
    return {"genes": list(map(str, cells.adata.var_names)),
            "hierarchy": cells.model_hierarchy.to_dict() if cells.model_hierarchy else None,
            "batch_key": options.batch_key, "batch_counts": batch_counts, "layer": options.layer,
            "outlier_counts": options.outlier_counts,
            "drop_empty_cells": bool(options.drop_empty_cells),
            "log_library": [float(library.mean()), float(library.std())]}


def distribution_strategy(devices: int):
    """None for one device; else a MirroredStrategy over `devices` GPUs or, without GPUs, over the
    CPU split into that many logical devices (which TensorFlow allows only before it first runs an
    operation, so call this before building anything)."""
    if devices == 1:
        return None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if len(gpus) < devices:
            raise ValueError(f"--devices {devices}: this machine has {len(gpus)} GPU(s); ask for at most that many.")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(devices)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) != devices:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
        except RuntimeError:
            raise ValueError(f"--devices {devices} without GPUs splits the CPU into logical devices, which TensorFlow "
                             f"allows only before it has run anything; start a new Python process (or pass "
                             f"devices= to the first model you build).") from None
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)])


def in_scope(strategy):
    """The strategy's scope (models must be built, compiled and loaded in it), or a no-op."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def new_model(options: TrainOptions, cells: Cells):
    """An untrained model for these cells (every setting checked before anything is written).
    Keras draws initializer seeds when layers are constructed, so the seed is set here (and again
    before the weights are built), making the CLI and the API build the same model."""
    keras.utils.set_random_seed(options.seed)
    arguments = model_arguments(options, cells.adata.n_vars, cells.model_hierarchy, cells.categories,
                                cells.adata.var_names)
    model = model_class(options.model)(**arguments, metadata=model_metadata(cells, options))
    check_empty_leaves(model, cells)
    return model, arguments


def check_empty_leaves(model, cells: Cells) -> None:
    """Refuse --empty-leaves that leave a labelled cell no leaf (its type is there), naming the labels."""
    if not getattr(model, "empty_leaves", None) or cells.labels is None or not model.semi_supervised:
        return
    stranded = stranded_by_empty_leaves(model.allowed(cells.labels), ~model.components_of(model.empty_leaves))
    if stranded.any():
        tree, rows = cells.model_hierarchy, cells.labels[stranded]
        finest = (rows >= 0).cumsum(axis=1).argmax(axis=1)                  # each cell's finest labelled level
        names = sorted({f"{tree.levels[level]}={tree.classes(level)[row[level]]}" for row, level in zip(rows, finest)})
        raise DataError(f"--empty-leaves leaves no leaf for {int(stranded.sum())} labelled cells ({', '.join(names)}): "
                        f"a labelled type is in the data. Drop its leaf from --empty-leaves, or those labels.")


def compile_model(model, options: TrainOptions, train_counts) -> None:
    """Create the weights (seeded here, so the CLI and the API draw the same ones), optionally set
    the prior from k-means on a PCA, and compile. XLA stays off on several devices: a
    jit-compiled step under MirroredStrategy fails to reach the other replicas' variables
    (measured here with TF 2.21 / Keras 3.15 on logical CPUs; keras-team/keras#18627)."""
    keras.utils.set_random_seed(options.seed)
    model.build()
    if options.init == "pca-kmeans":
        initialise_prior(model, train_counts, options.seed)
    model.compile(optimizer=keras.optimizers.Adam(options.learning_rate),
                  jit_compile=options.xla and options.devices == 1)
    # Built here, not inside the first traced step: a tf.function that creates variables while
    # tracing is traced a second time, which doubled the cost of starting every fit.
    model.optimizer.build(model.trainable_variables)


def fit(model, cells: Cells, split, options: TrainOptions, run=None, state=None, verbose=None,
        log=print) -> TrainingState:
    """Train with KL warm-up, the marginal-usage schedule and early stopping on the validation
    ELBO; returns the state (history, best epoch), the model holding its best weights."""
    X, covariates = cells.adata.X, cells.covariates
    initial_epoch = state["epoch"] + 1 if state else 0
    rows = lambda subset: None if covariates is None else covariates[split == subset]  # noqa: E731
    labels = lambda subset: None if cells.labels is None else cells.labels[subset]  # noqa: E731
    train_batches = CountBatches(X[split == "train"], options.batch_size, shuffle=True, seed=options.seed,
                                 covariates=rows("train"), labels=labels(split == "train"))
    train_batches.epoch = initial_epoch
    has_validation = (split == "validation").any()
    # Validation decodes every cluster or path per cell, so it uses the training batch size:
    # 1,024 cells x 360 paths in exact MoMixVAE mode would hold several GB for no gain. Its cells
    # go in a fixed random order: files store cells grouped by type, and a one-type batch would
    # show one component in use and inflate the batch-level marginal-usage term.
    validation = None
    if has_validation:
        order = np.random.default_rng(options.seed).permutation(np.flatnonzero(split == "validation"))
        validation = CountBatches(X[order], options.batch_size,
                                  covariates=None if covariates is None else covariates[order], labels=labels(order))
    monitor = "val_elbo" if has_validation else "elbo"
    tracker = TrainingState(run, monitor, options.patience, min(options.warm_up, options.epochs - 1), state, log)
    model.decoder.sparse_batch_cells = options.batch_size   # sizes the count law's sparse path
    if initial_epoch < options.epochs and tracker.state["wait"] < options.patience:
        # shuffle=False: CountBatches shuffles itself from (seed, epoch), so a resumed run sees the same order.
        model.fit(train_batches, validation_data=validation, epochs=options.epochs, initial_epoch=initial_epoch,
                  shuffle=False,
                  callbacks=[KLWarmUp(options.warm_up), MarginalUsageSchedule(options.marginal_usage, options.epochs),
                             tracker], verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose)
        for batches in (train_batches, validation):
            if batches is not None:
                batches.release()
    else:
        tracker.restore_best()
    return tracker


def training_outputs(model, cells: Cells, split):
    """The model's outputs for its training cells (None for a model without clusters): read once
    by `name_clusters` and `record_novelty_reference`."""
    if model.clustering == "none":
        return None
    train = np.asarray(split) == "train"
    covariates = None if cells.covariates is None else cells.covariates[train]
    return predict_outputs(model, cells.adata.X[train], PREDICT_BATCH_SIZE, covariates)


def calibrate_probabilities(model, cells: Cells, split) -> None:
    """Fit the temperature of a semi-supervised TreeVAE or MixtureVAE on its labelled validation cells
    (`calibration`); a temperature the model carried (a refit's source run) is dropped first, so
    the outputs it is fitted on are uncalibrated."""
    model.metadata.pop("temperature", None)
    validation = np.asarray(split) == "validation"
    if not applies(model) or cells.labels is None or not validation.any():
        return
    covariates = None if cells.covariates is None else cells.covariates[validation]
    out = predict_outputs(model, cells.adata.X[validation], PREDICT_BATCH_SIZE, covariates)
    fit_model_temperature(model, out, cells.labels[validation])


def describe_trained(model, cells: Cells, split) -> None:
    """What a trained model records about its training cells before it is saved: its clusters'
    names, the reference its novelty is read against and the temperature of its class probabilities."""
    calibrate_probabilities(model, cells, split)
    out = training_outputs(model, cells, split)
    name_clusters(model, cells, split, out)
    record_novelty_reference(model, out)


def name_clusters(model, cells: Cells, split, out) -> None:
    """Name each cluster of every level after the class it recovers best on the training cells
    (one-to-one Hungarian matching, kept where that class is also the cluster's most common one,
    `metrics.cluster_names`; other clusters get None), in model.metadata, so that a
    saved model predicts class names and can sample a named node. A flat model's one clustering
    is matched at every level. `out`: the model's outputs for the training cells (`training_outputs`)."""
    hierarchy = cells.hierarchy
    if hierarchy is None or model.clustering == "none":
        return
    if getattr(model, "semi_supervised", False):  # components are the classes, in the hierarchy's order
        tree = cells.model_hierarchy
        model.metadata["cluster_names"] = {
            level: tree.classes(i) + ["unassigned"] * (model.level_sizes[i] - tree.sizes[i])
            for i, level in enumerate(tree.levels)}
        return
    train = split == "train"
    truth = hierarchy.level_labels(cells.adata.obs[hierarchy.label_column].astype(str).to_numpy()[train])
    if model.clustering == "flat":
        probabilities = [out["cluster_probabilities"]] * hierarchy.n_levels
        clusters = [np.asarray(probabilities[0]).argmax(axis=1)] * hierarchy.n_levels
    else:
        probabilities = [out[f"level_{i + 1}_probabilities"] for i in range(hierarchy.n_levels)]
        clusters = model.level_predictions(probabilities)
    names = {}
    for i, level in enumerate(hierarchy.levels):
        mapping = cluster_names(truth[:, i], clusters[i])
        names[level] = [mapping.get(k) for k in range(np.asarray(probabilities[i]).shape[1])]
    model.metadata["cluster_names"] = names


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; carries the run folder so the command line can say how to resume."""

    def __init__(self, run_path, data):
        super().__init__(str(run_path))
        self.run_path, self.data = Path(run_path), data


def train(options: TrainOptions, log=print, given=None) -> Path:
    """Train a model as the options say and write its run folder; returns the folder.

    With --resume, the saved run's options are kept; `given` names the options the user typed
    (see `resumed_options`)."""
    run = RunDirectory(options.output or default_run_path(options))
    saved = check_folder(run, options)
    if saved is not None:
        options = resumed_options(saved, TrainOptions.from_dict({**options.to_dict(), "output": str(run.path)}),
                                  given, log)
    keras.utils.set_random_seed(options.seed)
    started = clock = time.time()
    stages = {}

    on_disk = ondisk.use_out_of_core(options.data, options.out_of_core, options.layer)
    adata = ondisk.read(options.data, options.layer) if on_disk else read_counts(options.data, layer=options.layer)
    checksum = file_checksum(options.data)
    if saved is not None and saved["data_checksum"] != checksum:
        raise DataError(f"{options.data} is not the file this run was trained on (checksum differs); "
                        f"resume with the original data or start a new run.")
    stages["read"], clock = time.time() - clock, time.time()
    store = None
    if on_disk:  # beside the run folder until the inputs have passed every check
        run.path.parent.mkdir(parents=True, exist_ok=True)
        store = Path(tempfile.mkdtemp(prefix="tmp-counts-", dir=run.path.parent))
    try:  # an out-of-core store is deleted unless it reaches the run folder
        cells = prepare_cells(adata, options, resolve_hierarchy(adata, options),
                              genes=saved["genes"] if saved else None, store=store)
        del adata
        stages["prepare"], clock = time.time() - clock, time.time()
        stages.update(getattr(cells.adata, "seconds", {}))
        prepared, hierarchy = cells.adata, cells.hierarchy
        split = make_split(cells, options) if saved is None else read_split(run, prepared.obs_names)
        strategy = distribution_strategy(options.devices)
        with in_scope(strategy):
            model, arguments = new_model(options, cells)
        check_enough_cells(model, split, options)
        if options.warm_up >= options.epochs:
            log(f"Note: --warm-up {options.warm_up} >= --epochs {options.epochs}: the KL weight never reaches 1, so "
                f"training optimises a down-weighted KL (the reported ELBO is still the true bound).")
        config = {"options": options.to_dict(), "model_arguments": arguments, "data_checksum": checksum,
                  "genes": list(prepared.var_names), "n_cells": int(prepared.n_obs),
                  "split_counts": {s: int((split == s).sum()) for s in ("train", "validation", "test")},
                  "hierarchy": hierarchy.to_dict() if hierarchy else None,
                  "preprocessing": prepared.uns.get("preprocessing", {}),
                  "predict_batch_size": PREDICT_BATCH_SIZE, "versions": _versions()}
        if saved is None:
            try:
                make_folder(run, log)
            except OSError as error:
                raise FileExistsError(f"Cannot write the run folder {run.path} ({error.strerror}); choose another "
                                      f"--output.") from None
            write_run_start(run, cells, split, config)
        elif options.to_dict() != saved["options"]:  # allowed changes, recorded
            config = {**saved, "options": options.to_dict(),
                      "resumed_with": saved.get("resumed_with", []) + [
                          {k: v for k, v in options.to_dict().items()
                           if saved["options"].get(k) != v and k not in NOT_COMPARED}]}
            write_json(run.config, config)
        if store is not None:
            _keep_store(store, run, prepared)
    except BaseException:
        if store is not None and store.exists():
            ondisk.remove_store(store)
        raise

    state = None
    if saved is not None and run.has_checkpoint():
        state = json.loads(run.checkpoint_state.read_text())
        with in_scope(strategy):
            model = load_checkpoint(run.checkpoint_model)
        log(f"Resuming {run.path} after epoch {state['epoch'] + 1}.")
    else:
        with in_scope(strategy):
            compile_model(model, options, prepared.X[split == "train"])
    log(f"Training {type(model).__name__} on {int((split == 'train').sum())} cells x {prepared.n_vars} genes "
        f"({_device(options.devices)}); run folder: {run.path}")
    clock = time.time()
    try:
        tracker = fit(model, cells, split, options, run=run, state=state, log=log)
    except KeyboardInterrupt:
        raise TrainingInterrupted(run.path, options.data) from None
    stages["train"] = time.time() - clock
    finish_run(run, model, cells, split, started, on_disk=on_disk, stages=stages,
               best_epoch=tracker.state["best_epoch"], epochs_run=tracker.state["epoch"] + 1)
    return run.path


def write_run_start(run: RunDirectory, cells: Cells, split, config: dict) -> None:
    """What a run folder holds before its model: the split, the labels it was given, its config."""
    write_csv(pd.DataFrame({"cell": cells.adata.obs_names, "set": split}), run.split, index=False)
    if cells.labels is not None:
        write_csv(labels_table(cells), run.labels, index_label="cell")
    write_json(run.config, config)


def finish_run(run: RunDirectory, model, cells: Cells, split, started: float, on_disk=False, stages=None,
               **recorded) -> dict:
    """Name the trained model's clusters, save it, write its outputs and metrics.json (with
    `recorded`, the seconds since `started` and, if given, the seconds of each stage)."""
    clock = time.time()
    describe_trained(model, cells, split)
    save_model_atomically(model, run.model)
    write = ondisk.write_outputs if on_disk else write_outputs
    metrics = write(run, model, cells.adata, split, cells.hierarchy, PREDICT_BATCH_SIZE, cells.covariates,
                    cells.labels, truth=leaf_truth(cells))
    metrics.update(recorded, seconds=round(time.time() - started, 1), out_of_core=on_disk)
    if "temperature" in model.metadata:
        metrics["temperature"] = model.metadata["temperature"]
    if stages is not None:
        metrics["stage_seconds"] = {k: round(v, 2) for k, v in {**stages, "outputs": time.time() - clock}.items()}
    write_json(run.metrics, metrics)
    return metrics


def _keep_store(store: Path, run: RunDirectory, prepared) -> None:
    """Move the out-of-core store into the run folder (counts/, replacing a resumed run's) and
    point the prepared counts at it."""
    kept = run.path / "counts"
    if kept.exists():
        ondisk.remove_store(kept)
    os.replace(store, kept)
    prepared.X = ondisk.DiskCounts(kept, rows=prepared.X.rows)


def read_split(run: RunDirectory, cells) -> np.ndarray:
    table = pd.read_csv(run.split, dtype=str).set_index("cell")["set"]
    missing = pd.Index(cells).difference(table.index)
    if len(missing):
        raise DataError(f"{len(missing)} cells of the data are not in the run's split (e.g. {list(missing[:3])}); "
                        f"resume with the data the run was trained on.")
    return table.loc[cells].to_numpy()


def _device(devices=1) -> str:
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    where = f"GPU: {gpus[0].name}" if gpus else "CPU"
    return where if devices == 1 else f"{devices} x {'GPU' if gpus else 'logical CPU'}, MirroredStrategy"


def _versions() -> dict:
    from importlib.metadata import version
    names = ("scvae-hier", "tensorflow", "tensorflow-probability", "keras", "numpy", "anndata", "scanpy")
    return {name: version(name) for name in names}
