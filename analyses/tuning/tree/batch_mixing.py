"""Is there batch structure left in TreeVAE's latent, within a cell type? (2026-12-05, tenth stop)

Before building a batch-invariance penalty on the latent (an MMD or adversarial term), measure whether
anything is left for it to remove. For each annotated finest class of a finished run (latent means,
outputs.h5ad X_scvae, every cell; classes of 50 cells or more): the share of each cell's 15 nearest
neighbours within its class that come from its own batch, against the share expected if batches
were fully mixed (the mean over the class's cells of their batch's share of the class). Equal
figures: no batch structure within the type; 1.0 against less: the batches apart.

    python analyses/tuning/tree/batch_mixing.py runs/partial/unsupervised_kang2018_s6 runs/partial/unsupervised_s6
"""
import sys

import anndata
import numpy as np
from sklearn.neighbors import NearestNeighbors

BATCH = {"kang": "sample_id", "pbmc": "source_dataset"}
NEIGHBOURS = 15

for run in sys.argv[1:]:
    outputs = anndata.read_h5ad(f"{run}/outputs.h5ad")
    key = BATCH["kang"] if "sample_id" in outputs.obs else BATCH["pbmc"]
    latent = np.asarray(outputs.obsm["X_scvae"], dtype=float)
    classes = outputs.obs[outputs.uns["hierarchy"]["levels"][-1]].astype(str).to_numpy()
    batch = outputs.obs[key].astype(str).to_numpy()
    parts = []
    for name in np.unique(classes):
        cells = np.flatnonzero(classes == name)
        if len(cells) < 50:
            continue
        near = NearestNeighbors(n_neighbors=NEIGHBOURS + 1).fit(latent[cells]).kneighbors(
            latent[cells], return_distance=False)[:, 1:]
        same = (batch[cells][near] == batch[cells][:, None]).mean()
        share = {b: np.mean(batch[cells] == b) for b in np.unique(batch[cells])}
        expected = np.mean([share[b] for b in batch[cells]])
        parts.append(f"{name} ({len(cells)}) {same:.2f} / {expected:.2f}")
    print(f"{run} [{key}]: own-batch share of neighbours / if mixed: " + "; ".join(parts), flush=True)
