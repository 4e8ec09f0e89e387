"""How high can any classifier go with most labels known? (issue 16's 5% and 10% targets)

    python analyses/partial_labels/ceiling.py runs/tree/tree-normal-f0/outputs.h5ad

On the cells of an unsupervised run on the poster's nine populations (the issue-12 experiment's
fold 0: its 500 genes' counts and its TreeVAE latent), classifiers are trained on 80% of the
cells' finest labels and scored on the other 20% (5 stratified folds), each leaf prediction mapped
up the hierarchy; ARI per level, mean over the folds. Features: log-normalised, scaled counts'
PCA 50 (scanpy) and the TreeVAE latent; classifiers: logistic regression, 15-nearest neighbours,
a one-layer MLP and gradient-boosted trees (scikit-learn). The latent saw every cell without
labels, as the semi-supervised models do.
"""
import sys

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.model_selection import StratifiedKFold
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler
from sklearn.pipeline import make_pipeline
a = ad.read_h5ad(sys.argv[1])
levels = ["level_1", "level_2", "level_3", "level_4"]
leaf = a.obs["level_4"].astype(str).to_numpy()
up = {l: dict(zip(a.obs["level_4"].astype(str), a.obs[l].astype(str))) for l in levels}
b = a.copy(); sc.pp.normalize_total(b, 1e4); sc.pp.log1p(b); sc.pp.scale(b, max_value=10); sc.tl.pca(b, 50)
feats = {"logPCA50": b.obsm["X_pca"], "TreeVAE latent": a.obsm["X_scvae"]}
models = {"LR": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0)),
          "kNN15": lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(15)),
          "MLP": lambda: make_pipeline(StandardScaler(), MLPClassifier((128,), max_iter=500, random_state=0)),
          "GBT": lambda: HistGradientBoostingClassifier(random_state=0)}
for fname, X in feats.items():
    for mname, make in models.items():
        scores = []
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=0).split(X, leaf):
            pred = make().fit(X[tr], leaf[tr]).predict(X[te])
            scores.append([adjusted_rand_score([up[l][t] for t in leaf[te]], [up[l][p] for p in pred]) for l in levels])
        s = np.array(scores)
        print(f"{fname:15s} {mname:6s} ARI L1-L4 " + " / ".join(f"{m:.3f}" for m in s.mean(0)), flush=True)
