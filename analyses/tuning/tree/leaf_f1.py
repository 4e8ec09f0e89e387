"""Where the finest level's weighted F1 is lost: per-class F1 of a run's own leaves against
classifiers told 80% of the labels (issue 12's level-4 weighted F1 target, 0.80).

    python analyses/tuning/tree/leaf_f1.py RUN_FOLDER...

For each run (outputs.h5ad of a finished TreeVAE run): its own finest clusters on the run's test
cells, F1 per class after the Hungarian mapping (`scvae_hier.metrics.hungarian_f1`, the
experiment's weighted F1); beside it, with every cell's label, logistic regression trained on 80%
of the cells and scored on the other 20% (5 stratified folds, every cell predicted once), on the
run's latent and on scanpy's log-normalised, scaled PCA 50 of its genes: how far supervised
classifiers get per class on the same cells, a ceiling for any clustering.
"""
import sys

import anndata as ad
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from scvae_hier.analysis.peers import scanpy_representation
from scvae_hier.metrics import hungarian_f1


def supervised(features, labels):
    """Out-of-fold predictions of logistic regression, 5 stratified folds (80% labels each)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return cross_val_predict(model, features, labels, cv=StratifiedKFold(5, shuffle=True, random_state=0))


def report(run):
    cells = ad.read_h5ad(f"{run}/outputs.h5ad")
    level = sorted(column for column in cells.obs if column.startswith("level_"))[-1]
    labels = cells.obs[level].astype(str).to_numpy()
    test = (cells.obs["split"] == "test").to_numpy()
    counts = cells.X.toarray() if hasattr(cells.X, "toarray") else np.asarray(cells.X)
    scores = {"own leaves (test cells)": hungarian_f1(labels[test], cells.obs[f"scvae_{level}_cluster"].to_numpy()[test]),
              "LR, 80% labels, latent": hungarian_f1(labels, supervised(cells.obsm["X_scvae"], labels)),
              "LR, 80% labels, log PCA 50": hungarian_f1(labels, supervised(scanpy_representation(counts), labels))}
    classes = sorted(set(labels))
    print(f"{run} ({level})\n| class | cells | " + " | ".join(scores) + " |\n|---|---|" + "---|" * len(scores))
    for name in classes:
        print(f"| {name} | {np.sum(labels == name)} | "
              + " | ".join(f"{score['per_class'][name]:.2f}" for score in scores.values()) + " |")
    print("| weighted F1 | | " + " | ".join(f"{score['weighted']:.3f}" for score in scores.values()) + " |\n")


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        report(folder)
