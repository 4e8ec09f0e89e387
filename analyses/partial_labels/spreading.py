"""Graph read-outs of a semi-supervised run's latent, scored on its unlabelled validation cells
(issue 16 tuning, measured and dropped: analyses/partial_labels/NOTES.md).

    python analyses/partial_labels/spreading.py runs/partial_tuning/NAME ... > spreading.txt

Per run, ARI per level of the unlabelled validation cells for:
- `own`: the model's own named predictions;
- `spread_kK_aA`: scikit-learn's LabelSpreading on the latent's K-nearest-neighbour graph from
  the labelled cells' finest labels alone (clamping alpha A), the leaf mapped up the hierarchy;
- `smooth_kK_aA`: the model's own leaf posterior smoothed over the same graph,
  F = (1 - A) Y + A S F (Y the posterior, labelled cells one-hot at their label).
"""
import sys

import anndata
import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import kneighbors_graph
from sklearn.semi_supervised import LabelSpreading


def level_scores(truth, leaves, up, cells):
    return [adjusted_rand_score(truth[level][cells], np.array([up[leaf][level] for leaf in leaves])[cells])
            for level in range(4)]


def main(folders):
    for folder in folders:
        adata = anndata.read_h5ad(f"{folder}/outputs.h5ad")
        labelled = adata.obs["labelled"].to_numpy(bool)
        cells = (adata.obs["split"] == "validation").to_numpy() & ~labelled
        truth = [adata.obs[f"level_{level}"].astype(str).to_numpy() for level in range(1, 5)]
        up = {leaf: [truth[level][i] for level in range(4)] for i, leaf in enumerate(truth[3])}
        own = adata.obs["scvae_level_4"].astype(str).to_numpy()
        latent = adata.obsm["X_scvae"]
        rows = {"own": [adjusted_rand_score(truth[level][cells], adata.obs[f"scvae_level_{level + 1}"].astype(str)
                                            .to_numpy()[cells]) for level in range(4)]}
        classes = sorted(set(truth[3][labelled]))
        seeds = np.array([classes.index(t) if known else -1 for t, known in zip(truth[3], labelled)])
        posterior = np.asarray(adata.obsm["scvae_level_4_probabilities"], float)
        column_names = [max(set(own[posterior.argmax(1) == j]) or {"?"}, key=list(own[posterior.argmax(1) == j]).count)
                        for j in range(posterior.shape[1])]                 # the leaf name of each column
        start = posterior / posterior.sum(1, keepdims=True)
        for i in np.flatnonzero(labelled):
            if truth[3][i] in column_names:
                start[i] = np.eye(len(column_names))[column_names.index(truth[3][i])]
        up["?"] = ["?"] * 4
        for k in (15, 30, 50):
            graph = kneighbors_graph(latent, k, include_self=False)
            graph = graph + graph.T
            step = sp.diags(1 / np.asarray(graph.sum(1)).ravel()) @ graph
            for alpha in (0.2, 0.5, 0.8, 0.9):
                spread = LabelSpreading(kernel="knn", n_neighbors=k, alpha=alpha, max_iter=200).fit(latent, seeds)
                rows[f"spread_k{k}_a{alpha}"] = level_scores(truth, np.array(classes)[spread.transduction_], up, cells)
                smoothed = start.copy()
                for _ in range(50):
                    smoothed = (1 - alpha) * start + alpha * (step @ smoothed)
                rows[f"smooth_k{k}_a{alpha}"] = level_scores(truth, np.array(column_names)[smoothed.argmax(1)], up,
                                                             cells)
        for key, values in rows.items():
            print(folder.rstrip("/").split("/")[-1], key, " ".join(f"{v:.3f}" for v in values), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
