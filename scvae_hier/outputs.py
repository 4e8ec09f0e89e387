"""Per-cell outputs of a trained model, written back into AnnData the way scanpy and
scvi-tools users expect.

Keys written by `scvae-hier train` into outputs.h5ad:
- obsm["X_scvae"]: latent means E_q[z|x] (use with sc.pp.neighbors(use_rep="X_scvae"));
- obsm["scvae_cluster_probabilities"] and obs["scvae_cluster"]: q(y|x) and its argmax (MixtureVAE);
- obsm["scvae_<level>_probabilities"] and obs["scvae_<level>_cluster"]: q(y_l|x) and its argmax for
  each hierarchy level (IndMoMVAE, MoMixVAE), e.g. obs["scvae_level_4_cluster"];
- obsm["X_scvae_<level>"]: IndMoMVAE's per-branch latent means;
- obs["scvae_<level>"]: the class name per level (semi-supervised TreeVAE, whose components are the
  hierarchy's classes; "unassigned" for its extra components), a cell's given label kept where it
  had one; obs["labelled"]: whether it had one;
- obs["split"]: train / validation / test;
- uns["scvae"]: the model name, its kind of clustering ("none", "flat" or "levels") and the
  first-look ARI per hierarchy level.
"""
import logging

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from .calibration import calibrate
from .data import CountBatches
from .files import write_h5ad

PREDICT_BATCH_SIZE = 1024  # fixed, so that reloaded models reproduce outputs bit for bit


class _ExpectedRetracing(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning. Every model traces its own
    predict function, for full batches and for the shorter last one, and TensorFlow counts the
    traces of all models' predict functions together (they share Keras' code), so predicting with
    three models or more warns although each traced only what it must, once."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


def predict_outputs(model, X, batch_size: int, covariates=None) -> dict:
    """Model outputs for every row of X (with its covariate row, for a model trained with a batch
    covariate), in order, as numpy arrays; class probabilities at the model's temperature where it
    has one (`calibration`)."""
    batches = CountBatches(X, batch_size, covariates=covariates)
    tensorflow_log, expected = logging.getLogger("tensorflow"), _ExpectedRetracing()
    tensorflow_log.addFilter(expected)
    try:
        return calibrate(model, model.predict(batches, verbose=0))
    finally:
        tensorflow_log.removeFilter(expected)
        batches.release()


def level_ari(hierarchy, labels, clusters_by_level) -> dict:
    """ARI per hierarchy level of that level's clustering (a flat model passes the same
    clustering for every level)."""
    level_labels = hierarchy.level_labels(labels)
    return {level: float(adjusted_rand_score(level_labels[:, i], clusters_by_level[i]))
            for i, level in enumerate(hierarchy.levels)}


def _add_clusters(adata, column, probabilities, clusters, obsm_key=None):
    """Store q(y|x) in obsm and the clusters as a categorical obs column; return the clusters."""
    probabilities = np.asarray(probabilities)
    adata.obsm[obsm_key or column.replace("_cluster", "_cluster_probabilities")] = probabilities
    adata.obs[column] = pd.Categorical(clusters.astype(str), categories=[str(k) for k in range(probabilities.shape[1])])
    return clusters


def annotate(adata, outputs, level_names, model=None) -> list:
    """Put a model's outputs into `adata` (obsm latent and probabilities, obs clusters) under the
    keys documented above; return the clustering of each level (the flat clustering repeated for
    a MixtureVAE, [] for the plain VAE, which has no clusters). Clusters are the model's
    `level_predictions` (argmax per level, or the nested rule of TreeVAE); without a model, argmax."""
    adata.obsm["X_scvae"] = np.asarray(outputs["latent"])
    if "cluster_probabilities" in outputs:  # one flat clustering, scored against every level
        probabilities = outputs["cluster_probabilities"]
        return [_add_clusters(adata, "scvae_cluster", probabilities, np.asarray(probabilities).argmax(axis=1))
                ] * len(level_names)
    n_levels = sum(f"level_{i}_probabilities" in outputs for i in range(1, len(level_names) + 1))
    probabilities = [outputs[f"level_{i}_probabilities"] for i in range(1, n_levels + 1)]
    predictions = (model.level_predictions(probabilities) if model is not None
                   else [np.asarray(p).argmax(axis=1) for p in probabilities])
    clusters_by_level = []
    for i, name in enumerate(level_names[:n_levels], start=1):
        clusters_by_level.append(_add_clusters(adata, f"scvae_{name}_cluster", probabilities[i - 1],
                                               predictions[i - 1], f"scvae_{name}_probabilities"))
        if f"level_{i}_latent" in outputs:
            adata.obsm[f"X_scvae_{name}"] = np.asarray(outputs[f"level_{i}_latent"])
    return clusters_by_level


def clustering_of(adata) -> str:
    """"none", "flat" or "levels": the kind of clustering of an annotated AnnData (outputs.h5ad or
    an evaluation's cells.h5ad), as the model declared it (runs written before 0.2: from the keys)."""
    recorded = adata.uns.get("scvae", {}).get("clustering")
    if recorded is not None:
        return str(recorded)
    if "scvae_cluster" in adata.obs:
        return "flat"
    return "levels" if any(k.startswith("scvae_") and k.endswith("_cluster") for k in adata.obs) else "none"


def level_names(hierarchy, outputs) -> list:
    """The hierarchy's level names, or level_1..level_L from the model's own levels."""
    if hierarchy is not None:
        return list(hierarchy.levels)
    n_levels = sum(1 for key in outputs if key.startswith("level_") and key.endswith("_probabilities"))
    return [f"level_{i}" for i in range(1, n_levels + 1)]


def class_names(model, level_names, outputs, given=None) -> dict:
    """{level: names} of the model's nested predictions, where a cell with labels (codes [n, L],
    -1 unlabelled) takes the most probable path through them, so it keeps its given labels."""
    probabilities = [np.asarray(outputs[f"level_{i + 1}_probabilities"]) for i in range(len(level_names))]
    clusters_by_level = model.level_predictions(probabilities, labels=given)
    return {level: component_names(model, level, p.shape[1])[clusters]
            for level, p, clusters in zip(level_names, probabilities, clusters_by_level)}


def component_names(model, level, n_components) -> np.ndarray:
    """The name of each component of a level: the class its cluster was matched to (or, with
    labels, the class it is), else "cluster <k>"."""
    own = model.metadata.get("cluster_names", {}).get(level) or [None] * n_components
    return np.array([n if n is not None else f"cluster {k}" for k, n in enumerate(own)], dtype=object)


def named_margin(model, level_names) -> dict:
    """TreeVAE's placement margin (`TreeVAE.placement_margin`) with levels and leaves named (leaves by
    their cluster names where they have one, else "cluster K"), and its one-line reading."""
    from .tree_clustering import describe_margin

    margin = model.metadata["placement_margin"]
    finest = model.metadata.get("cluster_names", {}).get(level_names[-1]) or []
    leaf_names = {k: (finest[k] if k < len(finest) and finest[k] is not None else f"cluster {k}")
                  for leaves in margin["regrouped"].values() for k in leaves}
    return {"margin": margin["margin"],
            "regrouped": {level_names[int(level)]: [leaf_names[k] for k in leaves]
                          for level, leaves in margin["regrouped"].items()},
            "reading": describe_margin(margin, leaf_names, level_names)}


def run_metrics(model, names, clusters_by_level, obs, hierarchy, truth=None, given=None) -> dict:
    """First-look metrics of a run's outputs (`obs` with its split): ARI of the model's own clusters
    on all, test and, with partial labels `given` [n, L], never-labelled cells, the scored cells'
    counts, and TreeVAE's named placement margin. truth [n]: the leaf labels to score against
    (default: the hierarchy's label column); cells without one are not scored."""
    split = obs["split"].to_numpy()
    subsets = [("all", np.ones(len(split), bool)), ("test", split == "test")]
    if given is not None:
        labelled = (given >= 0).any(axis=1)
        subsets.append(("unlabelled", ~labelled))
    metrics = {"model": type(model).__name__}
    if hierarchy is not None and clusters_by_level:
        labels = obs[hierarchy.label_column].astype(str).to_numpy() if truth is None else np.asarray(truth, str)
        known = np.isin(labels, list(hierarchy.paths))
        scored = {subset: mask & known for subset, mask in subsets if (mask & known).sum() > 1}
        metrics["ari"] = {subset: level_ari(hierarchy, labels[cells], [c[cells] for c in clusters_by_level])
                          for subset, cells in scored.items()}
        paths = {subset: hierarchy.level_labels(np.unique(labels[cells])) for subset, cells in scored.items()}
        one_class = {subset: [level for level, column in zip(hierarchy.levels, rows.T) if len(set(column)) == 1]
                     for subset, rows in paths.items()}   # from the paths of the leaves scored, not every cell
        if any(one_class.values()):  # ARI says nothing there: 0, or 1 for one cluster (one lineage labelled)
            metrics["ari_one_class_levels"] = {subset: levels for subset, levels in one_class.items() if levels}
        if given is not None:  # the model was trained on the labelled cells' labels: say how many of the scored are
            metrics["ari_scored_cells"] = {subset: {"cells": int(cells.sum()), "labelled": int((cells & labelled).sum())}
                                           for subset, cells in scored.items()}
    if "placement_margin" in model.metadata:
        metrics["placement_margin"] = named_margin(model, names)
    return metrics


def write_outputs(run, model, prepared, split, hierarchy, batch_size: int, covariates=None, given=None,
                  truth=None) -> dict:
    """Write outputs.h5ad into the run folder and return first-look metrics (ARI of the model's
    own clusters on all, test and, with partial labels `given`, never-labelled cells). truth [n]:
    the leaf labels to score against (default: the hierarchy's label column)."""
    outputs = predict_outputs(model, prepared.X, batch_size, covariates)
    adata = prepared.copy()
    adata.obs["split"] = pd.Categorical(split, categories=["train", "validation", "test"])
    names = level_names(hierarchy, outputs)
    clusters_by_level = annotate(adata, outputs, names, model)
    if given is not None:
        adata.obs["labelled"] = (given >= 0).any(axis=1)
        for level, values in class_names(model, names, outputs, given).items():
            adata.obs[f"scvae_{level}"] = pd.Categorical(values)
    metrics = run_metrics(model, names, clusters_by_level, adata.obs, hierarchy, truth, given)
    adata.uns["scvae"] = {"model": metrics["model"], "clustering": model.clustering,
                          "metrics": {k: v for k, v in metrics.items() if k != "model"}}
    write_h5ad(adata, run.outputs)
    return metrics
