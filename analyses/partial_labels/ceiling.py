"""How high can a plain classifier go, with most labels or with few? (issue 16's targets)

    python analyses/partial_labels/ceiling.py runs/tree/tree-normal-f0/outputs.h5ad

On the cells of an unsupervised run on the poster's nine populations (the issue-12 experiment's
fold 0: its 500 genes' counts and its TreeVAE latent), two features: log-normalised, scaled counts'
PCA 50 (scanpy) and the TreeVAE latent (which saw every cell without labels, as the semi-supervised
models do).
1. Most labels: classifiers (logistic regression, 15-nearest neighbours, a one-layer MLP,
   gradient-boosted trees; scikit-learn) trained on 80% of the cells' finest labels and scored on
   the other 20% (5 stratified folds), each leaf prediction mapped up the hierarchy; ARI per level.
2. Few labels at level 1 only: logistic regression on 1%, 5% and 10% of the cells (stratified by
   finest class, seeds 0-2), level-1 ARI on the other cells.
Output lines are in ceiling.txt.
"""
import sys

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

LEVELS = ["level_1", "level_2", "level_3", "level_4"]
CLASSIFIERS = {
    "LR": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
    "kNN15": lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(15)),
    "MLP": lambda: make_pipeline(StandardScaler(), MLPClassifier((128,), max_iter=500, random_state=0)),
    "GBT": lambda: HistGradientBoostingClassifier(random_state=0)}


def features(cells):
    counts = cells.copy()
    sc.pp.normalize_total(counts, 1e4)
    sc.pp.log1p(counts)
    sc.pp.scale(counts, max_value=10)
    sc.tl.pca(counts, 50)
    return {"logPCA50": counts.obsm["X_pca"], "TreeVAE latent": cells.obsm["X_scvae"]}


def most_labels(cells, feature_sets):
    leaf = cells.obs["level_4"].astype(str).to_numpy()
    up = {level: dict(zip(leaf, cells.obs[level].astype(str))) for level in LEVELS}
    for name, X in feature_sets.items():
        for classifier, make in CLASSIFIERS.items():
            scores = []
            for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(X, leaf):
                predicted = make().fit(X[train], leaf[train]).predict(X[test])
                scores.append([adjusted_rand_score([up[level][c] for c in leaf[test]],
                                                   [up[level][c] for c in predicted]) for level in LEVELS])
            print(f"80% finest labels  {name:15s} {classifier:6s} ARI L1-L4 "
                  + " / ".join(f"{m:.3f}" for m in np.mean(scores, axis=0)), flush=True)


def few_level_one_labels(cells, feature_sets):
    leaf = cells.obs["level_4"].astype(str).to_numpy()
    top = cells.obs["level_1"].astype(str).to_numpy()
    for fraction in (0.01, 0.05, 0.10):
        for name, X in feature_sets.items():
            scores = []
            for seed in range(3):
                rng = np.random.default_rng(seed)
                labelled = np.zeros(len(leaf), bool)
                for label in np.unique(leaf):
                    members = np.flatnonzero(leaf == label)
                    labelled[rng.choice(members, max(1, round(fraction * len(members))), replace=False)] = True
                predicted = CLASSIFIERS["LR"]().fit(X[labelled], top[labelled]).predict(X[~labelled])
                scores.append(adjusted_rand_score(top[~labelled], predicted))
            print(f"{fraction:.0%} level-1 labels  {name:15s} LR     level-1 ARI "
                  + " / ".join(f"{s:.3f}" for s in scores) + f"  mean {np.mean(scores):.3f}", flush=True)


if __name__ == "__main__":
    data = ad.read_h5ad(sys.argv[1])
    feature_sets = features(data)
    most_labels(data, feature_sets)
    few_level_one_labels(data, feature_sets)
