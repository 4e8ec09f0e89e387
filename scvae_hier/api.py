"""The Python API: train on the AnnData you hold, get results back into it, save, load, sample.

In the conventions of scvi-tools:

    import scvae_hier as sh
    sh.MoMixVAE.setup_anndata(adata, layer="counts", levels=["level_1", "level_2"], batch_key="donor")
    model = sh.MoMixVAE(adata, prior="student-t")
    model.train(max_epochs=100)
    adata.obsm["X_scvae_hier"] = model.get_latent_representation()
    adata.obs = adata.obs.join(model.predict_levels())
    model.save("pbmc_momix/"); model = sh.MoMixVAE.load("pbmc_momix/", adata=new_adata)
    cells = model.sample(n=500, node="CD8 T")

Every step runs the same code as the command line (`training.prepare_cells`, `new_model`,
`compile_model`, `fit`); the command line adds the run folder (checkpoints, resume, outputs).
Results are indexed by the caller's obs_names: cells the model did not see (no counts on its
genes, with drop_empty_cells) get NaN rather than a shifted row.
"""
from dataclasses import fields
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .choices import check_calling_rules, check_choice, check_whole
from .data import DataError, SetupError, validate_counts
from .expression import ExpressionMixin
from .hierarchy import Hierarchy
from .labels import label_codes
from .outputs import PREDICT_BATCH_SIZE, component_names
from .options import TrainOptions

SETUP_KEY = "_scvae_hier"  # adata.uns entry written by setup_anndata
# TrainOptions that are about files, runs or the command line, not the model or its training.
NOT_MODEL_OPTIONS = {"data", "model", "output", "resume", "overwrite", "layer", "label_column", "hierarchy",
                     "levels", "batch_key", "folds", "fold", "out_of_core"}
TRAIN_ARGUMENTS = {"max_epochs": "epochs", "batch_size": "batch_size", "learning_rate": "learning_rate",
                   "warm_up": "warm_up", "patience": "patience", "split": "split", "seed": "seed", "xla": "xla",
                   "init": "init"}


def _hierarchy_from(adata, hierarchy, levels, label_key, unlabelled_category=None):
    if hierarchy is not None and levels is not None:
        raise SetupError("Give either hierarchy= (a file, dict or Hierarchy) or levels= (obs columns), not both.")
    if isinstance(hierarchy, Hierarchy):
        return hierarchy
    if isinstance(hierarchy, dict):
        return Hierarchy.from_dict(hierarchy)
    if hierarchy is not None:
        return Hierarchy.from_file(hierarchy)
    if levels is not None:
        return Hierarchy.from_obs(adata.obs, list(levels), label_key, partial=True,
                                  unlabelled_category=unlabelled_category)
    if label_key is not None:
        return Hierarchy.from_obs(adata.obs, [label_key])
    if "hierarchy" in adata.uns:
        return Hierarchy.from_anndata(adata)
    return None


class HierarchyModel(ExpressionMixin):
    """Shared user API; each subclass names one model of `scvae_hier.models`."""

    model_name = None

    # ------------------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(cls, adata, layer=None, levels=None, hierarchy=None, label_key=None, batch_key=None,
                      unlabelled_category="Unknown") -> None:
        """Say where the counts, labels and batches are; checked now, stored in adata.uns.

        layer: the layer of raw counts (default X). levels: per-level obs columns, coarse to fine;
        or hierarchy: a TSV/JSON/YAML file, dict or Hierarchy mapping labels of obs[label_key] to
        paths (default: adata.uns['hierarchy'] if present). batch_key: obs column of a batch.
        Labels may have holes (NaN, empty or `unlabelled_category`) for a semi-supervised TreeVAE
        (`semi_supervised=True`); names not in the hierarchy and a fine label under the wrong
        coarse label are refused now, naming the cells."""
        if layer is not None and layer not in adata.layers:
            raise SetupError(f"adata has no layer {layer!r}; its layers are {list(adata.layers)} (layer=None uses X).")
        validate_counts(adata.layers[layer] if layer else adata.X, what=f"counts in {'layers[' + repr(layer) + ']' if layer else 'X'}")
        tree = _hierarchy_from(adata, hierarchy, levels, label_key, unlabelled_category)
        if tree is not None:
            if tree.label_column not in adata.obs:
                raise SetupError(f"The hierarchy maps labels of obs column {tree.label_column!r}, which adata lacks; "
                                 f"obs has {list(adata.obs.columns)}. Pass label_key= or a matching hierarchy.")
            label_codes(adata.obs, tree, levels, unlabelled_category)  # refuses unknown or inconsistent labels
        if batch_key is not None and batch_key not in adata.obs:
            raise SetupError(f"batch_key {batch_key!r} is not an obs column; obs has {list(adata.obs.columns)}.")
        adata.uns[SETUP_KEY] = {"layer": layer, "batch_key": batch_key, "levels": list(levels) if levels else None,
                                "unlabelled_category": unlabelled_category,
                                "hierarchy": tree.to_dict() if tree else None}

    @staticmethod
    def _setup_of(adata) -> dict:
        if SETUP_KEY not in adata.uns:
            raise SetupError("adata is not set up: call e.g. sh.MoMixVAE.setup_anndata(adata, layer=..., levels=[...]) "
                             "first, to say where the counts and labels are.")
        return adata.uns[SETUP_KEY]

    # ---------------------------------------------------------------------------- building
    def __init__(self, adata, **options):
        """Choose genes, check the cells and build the (untrained) model. Options are the command
        line's, with underscores (`scvae-hier train --help`): n_genes, exclude_labels, latent_dim,
        hidden, prior, likelihood, ... ; training settings go to `train`."""
        from .training import distribution_strategy, in_scope, new_model, prepare_cells

        known = {f.name for f in fields(TrainOptions)} - NOT_MODEL_OPTIONS
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown}; model options are {sorted(known)}.")
        setup = self._setup_of(adata)
        self.options = TrainOptions(model=self.model_name, layer=setup["layer"], batch_key=setup["batch_key"],
                                    levels=tuple(setup["levels"]) if setup.get("levels") else None,
                                    unlabelled_category=setup.get("unlabelled_category", "Unknown"),
                                    xla=options.pop("xla", True), **options)
        self.hierarchy = Hierarchy.from_dict(setup["hierarchy"]) if setup["hierarchy"] else None
        self.adata = adata
        self.cells = prepare_cells(self._counts_view(adata), self.options, self.hierarchy)
        self.hierarchy = self.cells.hierarchy
        self._strategy = distribution_strategy(self.options.devices)
        with in_scope(self._strategy):
            self.module, self.arguments = new_model(self.options, self.cells)
        self.history = None
        self.split = None
        self.is_trained = False

    @staticmethod
    def _counts_view(adata, layer=None):
        """An AnnData sharing obs/var whose X holds the counts (X or the setup's layer)."""
        layer = layer if layer is not None else adata.uns.get(SETUP_KEY, {}).get("layer")
        if layer and layer not in adata.layers:
            raise DataError(f"adata has no layer {layer!r}, where the model reads raw counts (it was set up with "
                            f"layer={layer!r}); its layers: {list(adata.layers)}. Put the counts there "
                            f"(adata.layers[{layer!r}] = counts).")
        return anndata.AnnData(X=adata.layers[layer] if layer else adata.X, obs=adata.obs, var=adata.var)

    def __repr__(self):
        state = "trained" if self.is_trained else "not trained"
        cells = f"{self.cells.adata.n_obs} cells x " if self.cells is not None else ""
        return (f"{type(self).__name__} on {cells}{len(self.module.metadata['genes'])} genes, {state}; "
                f"levels: {self.level_names or 'none'}")

    @property
    def temperature(self):
        """The temperature the class probabilities are read at (`calibration`: fitted on the
        labelled validation cells of a semi-supervised TreeVAE or MixtureVAE), or None."""
        return self.module.metadata.get("temperature")

    @property
    def level_names(self) -> list:
        hierarchy = self.module.metadata.get("hierarchy")
        if hierarchy:
            return list(hierarchy["levels"])
        return [f"level_{i + 1}" for i in range(len(getattr(self.module, "level_sizes", ())))]

    # ---------------------------------------------------------------------------- training
    def train(self, max_epochs=None, early_stopping=True, progress_bar=True, **settings) -> "HierarchyModel":
        """Fit with KL warm-up and early stopping on the validation ELBO (best weights kept).
        max_epochs: default 100, or 200 for a semi-supervised TreeVAE (`TrainOptions.epochs`).

        settings: batch_size, learning_rate, warm_up, patience, split (train, validation, test
        fractions), seed, xla, init ("random" or "pca-kmeans"). The split is in `self.split`,
        the per-epoch terms in `self.history` (a DataFrame)."""
        from .training import check_enough_cells, compile_model, describe_trained, fit, in_scope, make_split

        unknown = sorted(set(settings) - set(TRAIN_ARGUMENTS))
        if unknown:
            raise TypeError(f"Unknown training setting(s) {unknown}; choose from {sorted(TRAIN_ARGUMENTS)}.")
        if self.is_trained:
            raise RuntimeError("This model is trained already; build a new one to train again.")
        values = {TRAIN_ARGUMENTS[k]: v for k, v in settings.items()}
        if max_epochs is not None:
            values["epochs"] = int(max_epochs)
        if not early_stopping:
            values["patience"] = int(values.get("epochs", self.options.epochs)) + 1
        if "split" in values:
            values["split"] = tuple(values["split"])
        self.options = TrainOptions.from_dict({**self.options.to_dict(), **values})
        self.split = make_split(self.cells, self.options)
        check_enough_cells(self.module, self.split, self.options)
        train_counts = self.cells.adata.X[self.split == "train"]
        with in_scope(self._strategy):
            compile_model(self.module, self.options, train_counts)
        log = print if progress_bar else (lambda *_: None)
        state = fit(self.module, self.cells, self.split, self.options, verbose=1 if progress_bar else 0, log=log)
        self.history = pd.DataFrame(state.state["history"]).set_index("epoch")
        self.is_trained = True
        describe_trained(self.module, self.cells, self.split)
        if "placement_margin" in self.module.metadata:  # TreeVAE: how clearly its leaves are grouped, named
            from .outputs import named_margin
            log(named_margin(self.module, list(self.cells.hierarchy.levels))["reading"])
        return self

    # ---------------------------------------------------------------------------- outputs
    def _model_cells(self, adata, batch=None):
        """(counts [n, genes] of the model's genes, covariates, row of each cell in adata). `batch`:
        treat every cell as from this training batch (for query data from a batch the model never saw)."""
        from .data import batch_covariates, prepare

        meta = self.module.metadata
        counts = self._counts_view(adata, meta.get("layer"))
        if batch is not None:
            self._training_batch(batch, "batch")
            counts.obs = counts.obs.copy()
            counts.obs[meta["batch_key"]] = str(batch)
        prepared = prepare(counts, genes=meta["genes"], drop_empty_cells=meta.get("drop_empty_cells", False),
                           outlier_counts=meta.get("outlier_counts", "keep"))
        rows = adata.obs_names.get_indexer(prepared.obs_names)
        covariates, _ = batch_covariates(prepared.obs, meta.get("batch_key"), list(meta.get("batch_counts", {})))
        return prepared.X, covariates, rows

    def _cells_of(self, adata, batch=None):
        """(adata or the training AnnData, counts of the model's genes, covariates, row of each cell)."""
        self._check_trained()
        if adata is None:
            adata = self.adata
        if not isinstance(adata, anndata.AnnData):
            raise TypeError(f"adata must be an AnnData (cells x genes with obs_names and var_names), "
                            f"not {type(adata).__name__}.")
        if not adata.obs_names.is_unique:
            raise DataError("adata.obs_names are not unique, so results cannot be matched to cells; "
                            "call adata.obs_names_make_unique() first.")
        return (adata, *self._model_cells(adata, batch))

    def _training_batch(self, value, argument) -> int:
        """The index of a training batch the caller named (`batch=`, `transform_batch=`), refused
        by name when the model has no batch covariate or never saw that batch."""
        known = list(self.module.metadata.get("batch_counts", {}))
        if not self.module.metadata.get("batch_key"):
            raise SetupError(f"{argument}= was given, but the model was trained without a batch covariate.")
        if str(value) not in known:
            raise SetupError(f"{argument}={value!r} is not one of the model's training batches {known}.")
        return known.index(str(value))

    def _outputs(self, adata, batch=None):
        from .outputs import predict_outputs

        adata, X, covariates, rows = self._cells_of(adata, batch)
        return predict_outputs(self.module, X, PREDICT_BATCH_SIZE, covariates), rows, adata, (X, covariates)

    @staticmethod
    def _by_cell(values, rows, n_obs):
        """Rows of the model's cells placed at their rows of adata; NaN for cells it left out."""
        out = np.full((n_obs, *np.shape(values)[1:]), np.nan, dtype=np.result_type(values, np.float32))
        out[rows] = values
        return out

    def _decode(self, z, covariates=None, log_library=None) -> dict:
        """Decoder parameters [n, S, G] for S latents per cell, z [n, S, D]. The decoder's batch
        normalisation fixed the rank it was built on: [B, K, D] for models with clusters, [B, D]
        for the plain VAE, which decodes the S latents flattened."""
        import tensorflow as tf

        if self.module.clustering != "none":
            return self.module.decode(z, None, covariates, log_library=log_library)
        n, draws = tf.shape(z)[0], tf.shape(z)[1]
        repeat = lambda t: None if t is None else tf.repeat(t, draws, axis=0)  # noqa: E731  rows of z
        params = self.module.decode(tf.reshape(z, [n * draws, -1]), None, repeat(covariates),
                                    log_library=repeat(log_library))
        return {k: tf.reshape(v, [n, draws, -1]) for k, v in params.items()}

    def _check_clusters(self):
        if self.module.clustering == "none":
            raise RuntimeError(f"{type(self).__name__} has no clusters; use get_latent_representation.")

    def _check_trained(self):
        if not self.is_trained:
            raise RuntimeError("The model is not trained yet: call model.train() first.")

    def get_latent_representation(self, adata=None, batch=None) -> np.ndarray:
        """Latent means E_q[z|x], [cells of adata, latent_dim] (NaN rows for cells left out)."""
        out, rows, adata, _ = self._outputs(adata, batch)
        return self._by_cell(out["latent"], rows, adata.n_obs)

    def get_elbo(self, adata=None, batch=None, return_mean=True):
        """The evidence lower bound log p(x) >= ELBO in nats (higher is better; not negated, as in
        scvi-tools), with the KL terms at full weight whatever the warm-up left: the mean over the
        cells, or one value per cell of adata (NaN for cells left out) with return_mean=False.
        The same bound `scvae-hier evaluate` reports; cells are read as unlabelled."""
        from .bounds import elbo_terms

        adata, X, covariates, rows = self._cells_of(adata, batch)
        elbo = elbo_terms(self.module, X, batch_size=PREDICT_BATCH_SIZE, covariates=covariates)["elbo"]
        return float(np.mean(elbo)) if return_mean else self._by_cell(elbo, rows, adata.n_obs)

    def get_marginal_ll(self, adata=None, n_samples=100, batch=None, seed=0, return_mean=True):
        """The importance-weighted bound on log p(x) with `n_samples` draws from q(z|x) (Burda et
        al.'s IWAE; tighter than the ELBO and reaching log p(x) as n_samples grows), in nats: the
        mean over the cells, or per cell with return_mean=False. Seeded: the same arguments give
        the same numbers. scvi-tools' `get_marginal_ll` estimates the same quantity."""
        from .bounds import iwae

        check_whole("n_samples", n_samples, unit=" of draws")
        adata, X, covariates, rows = self._cells_of(adata, batch)
        bound = iwae(self.module, X, n_samples=int(n_samples), batch_size=PREDICT_BATCH_SIZE, seed=seed,
                     covariates=covariates)
        return float(np.mean(bound)) if return_mean else self._by_cell(bound, rows, adata.n_obs)

    def fit_new_batches(self, adata, max_epochs=50, batch_size=128, learning_rate=1e-3, seed=0,
                        progress_bar=False) -> "HierarchyModel":
        """A copy of this model that also knows the batches of `adata` it was not trained on.

        scArches' architecture surgery (`scvae_hier.query`): each new batch gets a covariate
        column, and only that column's weights are fitted, on adata's cells, for `max_epochs`; the
        reference's latent space, prior and cluster names stay as trained, so the query is named
        by the reference's classes. This model is unchanged; adata becomes the copy's default data.
        The copy's `query_history` holds the loss per epoch."""
        from .data import batch_covariates, prepare
        from .query import extend_batches, fit_new_batches, unseen_batches

        self._check_trained()
        meta = self.module.metadata
        key = meta.get("batch_key")
        if not key:
            raise SetupError("This model was trained without a batch covariate, so there are no batch weights to fit; "
                             "annotate the query as it is, or train the reference with batch_key= to use this.")
        if key not in adata.obs:
            raise DataError(f"The query has no obs column {key!r}, the model's batch key; add each query cell's "
                            f"batch there (obs has {list(adata.obs.columns)}).")
        prepared = prepare(self._counts_view(adata, meta.get("layer")), genes=meta["genes"],
                           drop_empty_cells=meta.get("drop_empty_cells", False),
                           outlier_counts=meta.get("outlier_counts", "keep"))
        values = prepared.obs[key].astype(str)
        new = unseen_batches(self.module, values)
        if not new:
            raise SetupError(f"Every batch of the query ({sorted(set(values))}) is one the model was trained on; "
                             f"annotate it directly (predict_levels), there is nothing new to fit.")
        extended, grown = extend_batches(self.module, new, values.value_counts().to_dict())
        covariates, _ = batch_covariates(prepared.obs, key, list(extended.covariates))
        log = print if progress_bar else None
        history = fit_new_batches(extended, grown, prepared.X, covariates, max_epochs, batch_size, learning_rate,
                                  seed, log)
        model = object.__new__(type(self))
        model.__dict__.update(self.__dict__)
        model.module, model.arguments = extended, extended.get_config()
        model.adata, model.cells, model.split = adata, None, None
        model.query_history = history
        return model

    def predict_levels(self, adata=None, prefix="scvae_", unassigned_below=0.0, keep_labels=True,
                       batch=None, novelty_cutoff=None) -> pd.DataFrame:
        """Per level: the predicted class name (`scvae_<level>`), its cluster (`scvae_<level>_cluster`)
        and posterior probability (`scvae_<level>_probability`), indexed by adata.obs_names, ready for
        `adata.obs = adata.obs.join(...)` (the prefix keeps them apart from the true level columns).
        TreeVAE also gives `scvae_novelty`: the share of the training cells of the cell's most probable
        component that the model explains better (its ELBO per count; about uniform on cells like
        the training cells, 1.0 beyond them all; `scvae_hier.novelty`).

        unassigned_below: from the first level whose probability is below this, the name is
        "unassigned" (0: never). novelty_cutoff: cells whose novelty is above this are "unassigned"
        at every level (None: never; the README says what 0.99 found and missed). keep_labels:
        the training cells of a semi-supervised model keep the labels they were given, at the levels
        they were given (neither rule makes them "unassigned" there; `scvae_labelled` says which
        cells those are). batch: a training batch to read query cells as (new batches are refused)."""
        check_calling_rules(unassigned_below, novelty_cutoff)
        training_cells = adata is None or adata is self.adata
        return self._named_levels(self._outputs(adata, batch), training_cells, prefix, unassigned_below,
                                  keep_labels, novelty_cutoff)

    def _named_levels(self, outputs, training_cells, prefix="scvae_", unassigned_below=0.0, keep_labels=True,
                      novelty_cutoff=None) -> pd.DataFrame:
        """predict_levels from the encoder's outputs (`_outputs`), so that a caller that also needs
        the latent or the counts reads the cells once (their callers check the rules' values first).
        training_cells: the cells are the model's own."""
        self._check_clusters()
        given = None
        if keep_labels and training_cells and getattr(self.cells, "labels", None) is not None:
            given = self.cells.labels
        table = self._predict_levels(outputs, given)
        levels = self.level_names or ["cluster"]
        # Levels a cell was given labels at (completed upwards, so the first `depth`) keep them.
        depth = np.zeros(len(table), dtype=int)
        if given is not None:
            depth = (self._given_labels(table.index, given) >= 0).sum(axis=1)
            table["labelled"] = depth > 0  # whose names are the labels they were given, not the model's call
        unassigned = np.zeros(len(table), dtype=bool)
        if novelty_cutoff is not None:
            if "novelty" not in table:
                raise ValueError(self._no_novelty())
            unassigned |= (table["novelty"] > novelty_cutoff).to_numpy()
        for i, level in enumerate(levels):
            if unassigned_below > 0:
                unassigned |= (table[level + "_probability"] < unassigned_below).to_numpy()
            called = unassigned & table[level + "_probability"].notna().to_numpy() & (depth <= i)
            if called.any():
                names = table[level].astype(object)
                names[called] = "unassigned"
                table[level] = names.astype("category")
        return table.add_prefix(prefix)

    def predict_probabilities(self, adata=None, level=-1, batch=None) -> pd.DataFrame:
        """q(y_l | x) of one level by class: cells x the level's class names (scANVI's
        `predict(soft=True)`), rows summing to 1, NaN rows for cells the model left out. Components
        that share a name are summed (a flat MixtureVAE's clusters under one coarse class);
        components no class was matched to are columns "cluster <k>". TreeVAE's levels nest: a
        class's column is the sum of its children's; its calls (predict_levels) are the most
        probable leaf and that leaf's ancestors, so a coarse call is not always its level's largest
        column. This is the model's posterior for every cell, labelled training cells too
        (predict_levels keeps their given labels instead).

        level: a level name or index (default: the finest). batch: as for predict_levels."""
        self._check_clusters()
        levels = self.level_names or ["cluster"]
        if isinstance(level, str):
            if level not in levels:
                raise ValueError(f"level={level!r} is not one of the model's levels {levels}.")
            index = levels.index(level)
        elif isinstance(level, (int, np.integer)) and not isinstance(level, bool) and -len(levels) <= level < len(levels):
            index = int(level) % len(levels)
        else:
            raise ValueError(f"level must be a level name {levels} or an index in [-{len(levels)}, {len(levels)}), "
                             f"got {level!r}.")
        return self._class_probabilities(self._outputs(adata, batch), index)

    def _class_probabilities(self, outputs, index) -> pd.DataFrame:
        """predict_probabilities of level `index` from the encoder's outputs (`_outputs`)."""
        out, rows, adata, _ = outputs
        key = "cluster_probabilities" if self.module.clustering == "flat" else f"level_{index + 1}_probabilities"
        probabilities = np.asarray(out[key], dtype=np.float64)
        names = self._component_names(index, probabilities.shape[1])
        classes = list(dict.fromkeys(names))
        by_class = np.stack([probabilities[:, names == c].sum(axis=1) for c in classes], axis=1)
        return pd.DataFrame(self._by_cell(by_class, rows, adata.n_obs), index=adata.obs_names,
                            columns=pd.Index(classes, name=(self.level_names or ["cluster"])[index]))

    def _query_results(self, adata, batch=None, unassigned_below=0.0, novelty_cutoff=None):
        """What `annotate` writes, from one pass of the model over adata's cells: predict_levels'
        table (or None for a model without clusters), predict_probabilities of every level by level
        name, and the latent means [cells of adata, D]."""
        outputs = self._outputs(adata, batch)
        out, rows, adata, _ = outputs
        latent = self._by_cell(out["latent"], rows, adata.n_obs)
        if self.module.clustering == "none":
            return None, {}, latent
        table = self._named_levels(outputs, adata is self.adata, unassigned_below=unassigned_below,
                                   novelty_cutoff=novelty_cutoff)
        levels = self.level_names or ["cluster"]
        return table, {level: self._class_probabilities(outputs, i) for i, level in enumerate(levels)}, latent

    def _given_labels(self, names, given) -> np.ndarray:
        """[cells named, L] the label codes `given` to the training cells, by cell name (-1: a cell
        the model did not train on, or unlabelled)."""
        position = self.cells.adata.obs_names.get_indexer(names)
        return np.where(position[:, None] >= 0, given[np.maximum(position, 0)], -1)

    def _no_novelty(self) -> str:
        """Why this model gives no novelty, and what to do."""
        from .novelty import gives_scores

        if not gives_scores(self.module):
            return (f"novelty_cutoff needs TreeVAE (--model tree), whose cells are scored against its prior "
                    f"components; not {type(self.module).__name__}.")
        return ("This model was saved without the training cells' scores that novelty is read against (saved "
                "before novelty existed); record them with `scvae-hier refit RUN --output NEW`, or train again.")

    def _predict_levels(self, outputs, given=None) -> pd.DataFrame:
        """predict_levels without the prefix and the unassigned rules, from `_outputs`.

        Names come from the Hungarian matching of clusters to classes on the training cells;
        a cluster no class was matched to (or a model trained without labels) gives "cluster <k>".
        A flat MixtureVAE's one clustering is named at the finest level and each coarser level
        takes the ancestors of that name, so its predictions nest."""
        out, rows, adata, inputs = outputs
        levels = self.level_names or ["cluster"]
        if self.module.clustering == "flat":
            columns = self._flat_levels(np.asarray(out["cluster_probabilities"]), levels)
        else:
            probabilities = [np.asarray(out[f"level_{i + 1}_probabilities"]) for i in range(len(levels))]
            # A semi-supervised model's training cells: the most probable path through their labels.
            if given is not None:  # aligned by cell name (cells the model left out have none)
                given = self._given_labels(adata.obs_names[rows], given)
            clusters = self.module.level_predictions(probabilities, **({} if given is None else {"labels": given}))
            columns = []
            for i, (p, cluster) in enumerate(zip(probabilities, clusters)):
                label = list(self._component_names(i, p.shape[1])[cluster])
                columns.append((label, cluster, p[np.arange(len(cluster)), cluster]))
        table = pd.DataFrame(index=adata.obs_names)
        for level, (label, cluster, probability) in zip(levels, columns):
            for suffix, values in (("", label), ("_cluster", cluster), ("_probability", probability)):
                column = pd.Series(np.nan if suffix else None, index=table.index, dtype=float if suffix else object)
                column.iloc[rows] = values
                table[level + suffix] = column.astype("category") if not suffix else column
        reference = self.module.metadata.get("novelty_reference")
        if reference is not None and "elbo_per_count" in out:
            table["novelty"] = np.nan
            table.iloc[rows, table.columns.get_loc("novelty")] = self._novelty(out, inputs, reference)
        return table

    def _novelty(self, out, inputs, reference) -> np.ndarray:
        """`novelty.novelty` of the cells at the training cells' depth: cells deeper than the training
        cells (median counts) are scored after binomial thinning to it; much shallower ones are warned of."""
        import warnings

        from .novelty import NoveltyDepthWarning, depth_warning, novelty, thinned, thinning_factor
        from .outputs import predict_outputs

        message = depth_warning(out["counts"], reference)
        if message:
            warnings.warn(message, NoveltyDepthWarning, stacklevel=4)
        factor = thinning_factor(out["counts"], reference)
        if factor < 1:   # `inputs`: the cells' counts of the model's genes and covariates, as predicted
            X, covariates = inputs
            out = predict_outputs(self.module, thinned(X, factor), PREDICT_BATCH_SIZE, covariates)
        return novelty(out["elbo_per_count"], out["component"], reference)

    def _component_names(self, level_index, n_components) -> np.ndarray:
        """The name of each component of a level: the class its cluster was matched to, else
        "cluster <k>"; a flat model's clusters are named by their finest class's ancestor at that
        level, so several of them can share a name."""
        levels = self.level_names or ["cluster"]
        names = self.module.metadata.get("cluster_names", {})
        if self.module.clustering == "flat":
            finest = names.get(levels[-1]) or [None] * n_components
            return np.array([self._ancestor(n, level_index) if n and self.hierarchy else (n or f"cluster {k}")
                             for k, n in enumerate(finest)], dtype=object)
        return component_names(self.module, levels[level_index], n_components)

    def _flat_levels(self, probabilities, levels) -> list:
        """A flat clustering read at every level: the cluster's matched finest class and its
        ancestors (so the names nest), with the probability of every cluster under that name."""
        cluster = probabilities.argmax(axis=1)
        columns = []
        for i in range(len(levels)):
            names = self._component_names(i, probabilities.shape[1])
            label = names[cluster]
            same = names[None, :] == label[:, None]                        # [cells, clusters]
            columns.append((list(label), cluster, (probabilities * same).sum(axis=1)))
        return columns

    def _ancestor(self, leaf_class, level_index):
        """The class at `level_index` above a finest-level class."""
        for path in self.hierarchy.paths.values():
            if path[-1] == leaf_class:
                return path[level_index]
        return leaf_class

    # ---------------------------------------------------------------------------- saving
    def save(self, folder, overwrite=False) -> Path:
        """Write model.keras (weights, options, genes, hierarchy, cluster names) and history.csv."""
        from .runs import save_model_atomically

        self._check_trained()
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} is a file; save needs a folder (it writes model.keras and history.csv).")
        if (folder / "model.keras").exists() and not overwrite:
            raise FileExistsError(f"{folder} already holds a model; pass overwrite=True or another folder.")
        folder.mkdir(parents=True, exist_ok=True)
        save_model_atomically(self.module, folder / "model.keras")
        if self.history is not None:
            self.history.to_csv(folder / "history.csv")
        return folder

    @classmethod
    def load(cls, folder, adata=None) -> "HierarchyModel":
        """A saved model (a `save` folder, a `scvae-hier train` run folder, or a .keras file).

        With `adata`, its genes are checked now (matched by name, any order; missing genes are
        refused by name) and it becomes the default data of get_latent_representation etc."""
        from .models import MODELS
        from .runs import load_model

        module = load_model(folder)
        name = next((n for n, (_, c) in MODELS.items() if c == type(module).__name__), None)
        if cls.model_name is not None and name != cls.model_name:
            raise SetupError(f"{folder} holds a {type(module).__name__}, not a {cls.__name__}; "
                             f"load it with sh.load({str(folder)!r}) or sh.{API_CLASSES[name].__name__}.load.")
        if "genes" not in module.metadata:
            raise SetupError(f"{folder} was saved without its gene list (before scvae-hier 0.2); retrain it to "
                             f"use it from Python.")
        model = object.__new__(API_CLASSES[name])
        model.module, model.arguments = module, module.get_config()
        hierarchy = module.metadata.get("hierarchy")
        model.hierarchy = Hierarchy.from_dict(hierarchy) if hierarchy else None
        model.options = None
        model.history = None
        history = Path(folder) / "history.csv"
        if Path(folder).is_dir() and history.is_file():
            model.history = pd.read_csv(history).set_index("epoch")
        model.split, model.cells, model.is_trained, model._strategy = None, None, True, None
        model.adata = None
        if adata is not None:
            model._model_cells(adata)  # refuses missing genes by name
            model.adata = adata
        return model

    # ---------------------------------------------------------------------------- sampling
    def sample(self, n=100, node=None, level=None, batch=None, seed=0) -> anndata.AnnData:
        """Draw `n` cells from the generative model, from the prior restricted to a hierarchy
        node (a class name at any level; `level` picks the level when a name repeats), or from
        the whole prior. Returns counts of the model's genes; obs["node"] says what was asked.
        A batch-covariate model draws each cell's batch from the training mix unless `batch` is given;
        the library size (with library_size="observed") is log-normal as on the training cells."""
        import tensorflow as tf
        import tensorflow_probability as tfp

        from .sampling import sample_counts

        self._check_trained()
        check_whole("n", n, minimum=0, unit=" of cells")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer; got {seed!r}.")
        if batch is not None and not self.module.n_covariates:
            raise ValueError(f"This model was trained without a batch covariate, so batch={batch!r} has no meaning; "
                             f"leave it out.")
        rng = np.random.default_rng(seed)
        meta = self.module.metadata
        if node is None:
            prior = self.module.prior()
        else:
            log_weights, components, _ = self.module.prior_mixture()
            keep = self._components_under(node, level)
            log_weights = tf.where(tf.constant(keep), log_weights, -np.inf)
            prior = tfp.distributions.MixtureSameFamily(tfp.distributions.Categorical(logits=log_weights), components)
        z = prior.sample(int(n), seed=tf.constant([seed, 0], tf.int32))
        covariates, batches = None, None
        if self.module.n_covariates:
            counts = meta["batch_counts"]
            categories = list(counts)
            if batch is not None:
                check_choice("batch", str(batch), categories)
                batches = np.array([str(batch)] * int(n))
            else:
                freq = np.array([counts[c] for c in categories], dtype=float)
                batches = rng.choice(categories, size=int(n), p=freq / freq.sum())
            covariates = np.eye(len(categories), dtype=np.float32)[pd.Index(categories).get_indexer(batches)]
        mean, sd = meta.get("log_library", [0.0, 0.0])
        log_library = tf.constant(rng.normal(mean, sd, int(n)), tf.float32)
        params = {k: v[:, 0].numpy().astype(np.float64) for k, v in self._decode(z[:, None], covariates,
                                                                                  log_library).items()}
        counts = sample_counts(params, rng)
        obs = pd.DataFrame({"node": [str(node) if node is not None else "prior"] * int(n)},
                           index=[f"sample_{i}" for i in range(int(n))])
        if batches is not None:
            obs[meta["batch_key"]] = batches
        return anndata.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs,
                               var=pd.DataFrame(index=meta["genes"]))

    def _components_under(self, node, level=None) -> np.ndarray:
        """Boolean mask over the prior's components: those whose cluster at the node's level was
        matched to the node (flat model: whose finest class lies under it)."""
        if self.hierarchy is None:
            raise SetupError("Sampling a node needs a model trained with a hierarchy (labels).")
        levels = self.hierarchy.levels
        where = [i for i, name in enumerate(levels) if node in self.hierarchy.classes(i)]
        if level is not None:
            index = self.hierarchy._level(level)
            if index not in where:
                raise SetupError(f"{node!r} is not a class of level {levels[index]!r}; its classes are "
                                 f"{self.hierarchy.classes(index)}.")
            where = [index]
        if not where:
            raise SetupError(f"{node!r} is not a class of the hierarchy; classes per level: "
                             + "; ".join(f"{lv}: {self.hierarchy.classes(i)}" for i, lv in enumerate(levels)))
        names = self.module.metadata.get("cluster_names", {})
        _, _, component_levels = self.module.prior_mixture()
        # A name repeated at several levels (a class that does not split) means the same cells:
        # use the finest of those levels at which some cluster was matched to it.
        for index in reversed(where):
            if component_levels is None:  # flat: components named at the finest level
                leaves = {path[-1] for path in self.hierarchy.paths.values() if path[index] == node}
                keep = np.array([name in leaves for name in names.get(levels[-1], [])])
            else:
                level_names = names.get(levels[index], [])
                keep = np.array([c >= 0 and level_names[c] == node for c in component_levels[index]])
            if keep.any():
                return keep
        raise SetupError(f"No cluster of the model was matched to {node!r} on the training cells, so there is "
                         f"nothing to sample it from; matched names per level: "
                         + "; ".join(f"{lv}: {names.get(lv)}" for lv in levels))


class VAE(HierarchyModel):
    """The plain VAE: a Gaussian latent with a N(0, I) prior (no clusters)."""
    model_name = "vae"


class MixtureVAE(HierarchyModel):
    """scVAE's Gaussian-mixture VAE: one flat clustering q(y|x)."""
    model_name = "mixture"


class IndMoMVAE(HierarchyModel):
    """Independent mixture branches, one clustering per hierarchy level."""
    model_name = "indmom"


class MoMixVAE(HierarchyModel):
    """The nested mixture-of-mixtures prior, one clustering per hierarchy level."""
    model_name = "momix"


class TreeVAE(HierarchyModel):
    """A mixture over the hierarchy's leaves read at every level by summing: predictions nest."""
    model_name = "tree"


API_CLASSES = {cls.model_name: cls for cls in (VAE, MixtureVAE, IndMoMVAE, MoMixVAE, TreeVAE)}


def load(folder, adata=None) -> HierarchyModel:
    """Load any saved model (`save` folder, run folder or .keras file) into its API class."""
    return HierarchyModel.load(folder, adata=adata)
