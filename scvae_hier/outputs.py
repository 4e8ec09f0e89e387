"""Per-cell outputs of a trained model, written back into AnnData the way scanpy and
scvi-tools users expect.

Keys written by `scvae-hier train` into outputs.h5ad:
- obsm["X_scvae"]: latent means E_q[z|x] (use with sc.pp.neighbors(use_rep="X_scvae"));
- obsm["scvae_cluster_probabilities"] and obs["scvae_cluster"]: q(y|x) and its argmax (mixtures);
- obs["split"]: train / validation / test;
- uns["scvae"]: the model name and the first-look ARI per hierarchy level.
"""
import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from .data import CountBatches


def predict_outputs(model, X, batch_size: int) -> dict:
    """Model outputs for every row of X, in order, as numpy arrays."""
    return model.predict(CountBatches(X, batch_size), verbose=0)


def level_ari(hierarchy, labels, clusters) -> dict:
    """ARI of one clustering against the labels of every hierarchy level."""
    level_labels = hierarchy.level_labels(labels)
    return {level: float(adjusted_rand_score(level_labels[:, i], clusters))
            for i, level in enumerate(hierarchy.levels)}


def write_outputs(run, model, prepared, split, hierarchy, batch_size: int) -> dict:
    """Write outputs.h5ad into the run folder and return first-look metrics."""
    outputs = predict_outputs(model, prepared.X, batch_size)
    adata = prepared.copy()
    adata.obs["split"] = pd.Categorical(split, categories=["train", "validation", "test"])
    adata.obsm["X_scvae"] = np.asarray(outputs["latent"])
    metrics = {"model": type(model).__name__}
    if "cluster_probabilities" in outputs:
        probabilities = np.asarray(outputs["cluster_probabilities"])
        clusters = probabilities.argmax(axis=1)
        adata.obsm["scvae_cluster_probabilities"] = probabilities
        adata.obs["scvae_cluster"] = pd.Categorical(clusters.astype(str),
                                                    categories=[str(k) for k in range(probabilities.shape[1])])
        if hierarchy is not None:
            labels = adata.obs[hierarchy.label_column].astype(str).to_numpy()
            metrics["ari"] = {subset: level_ari(hierarchy, labels[mask], clusters[mask])
                              for subset, mask in (("all", np.ones(len(split), bool)), ("test", split == "test"))
                              if mask.any()}
    adata.uns["scvae"] = {"model": metrics["model"], "metrics": {k: v for k, v in metrics.items() if k != "model"}}
    adata.write_h5ad(run.outputs, compression="gzip")
    return metrics
