"""Do the latent's own clustering objectives prefer the annotated leaves? (2026-12-05, tenth stop)

For each finished unsupervised TreeVAE run (its latent means, outputs.h5ad X_scvae, every cell),
two objectives of a partition of the latent into leaves, for the annotated finest classes and for
the run's own finest clusters (lower is better for both):
- within-class sum of squares (k-means' objective, what the re-seeding's grouping minimises);
- the negative log-likelihood per cell of a diagonal-Gaussian mixture with each class's own
  variances and weights at their maximum (up to constants): a variance-aware objective, which
  does not push a big, wide class to split the way the sum of squares does.
If the annotated leaves scored better under the second, a variance-aware grouping rule would be
worth building. Prints one line per run.

    python analyses/tuning/tree/truth_objectives.py runs/partial/unsupervised_kang2018_s{6..11} runs/partial/unsupervised_s{6..8}
"""
import sys

import anndata
import numpy as np
from sklearn.metrics import adjusted_rand_score

from scvae_hier.tree_clustering import _within_leaves as within_sum_of_squares  # what the grouping minimises


def gaussian_cost(latent, classes):
    """-log-likelihood per cell of the ML diagonal-Gaussian mixture with these classes as components,
    up to a constant."""
    n, cost = len(latent), 0.0
    for k in np.unique(classes):
        points = latent[classes == k]
        cost += 0.5 * len(points) * np.log(points.var(axis=0) + 1e-6).sum() - len(points) * np.log(len(points) / n)
    return cost / n


for run in sys.argv[1:]:
    outputs = anndata.read_h5ad(f"{run}/outputs.h5ad")
    latent = np.asarray(outputs.obsm["X_scvae"], dtype=float)
    truth = outputs.obs[outputs.uns["hierarchy"]["levels"][-1]].astype(str).to_numpy()
    own = outputs.obs[f"scvae_{outputs.uns['hierarchy']['levels'][-1]}_cluster"].astype(str).to_numpy()
    print(f"{run}: finest-level ARI of its own clusters {adjusted_rand_score(truth, own):.3f}; "
          f"within-class sum of squares annotated {within_sum_of_squares(latent, truth):.0f}, "
          f"own {within_sum_of_squares(latent, own):.0f}; "
          f"diagonal-Gaussian cost annotated {gaussian_cost(latent, truth):.3f}, own {gaussian_cost(latent, own):.3f}",
          flush=True)
