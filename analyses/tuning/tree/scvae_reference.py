"""The original scVAE GMVAE run shipped in data/scvae_reference (trained on all nine populations'
cells, so it has seen these cells), its own clusters scored on each PBMC tuning run's validation
cells: ARI per level and level-4 weighted F1 (a flat clustering scored against every level).

    python analyses/tuning/tree/scvae_reference.py RUN [RUN ...]
"""
import json
import sys
from pathlib import Path

import anndata
import numpy as np
from sklearn.metrics import adjusted_rand_score

from scvae_hier.analysis.scvae_runs import find_scvae_runs, read_scvae_run
from scvae_hier.metrics import hungarian_f1
from scvae_hier.hierarchy import Hierarchy

ROOT = Path(__file__).resolve().parents[3]
reference = read_scvae_run(find_scvae_runs(ROOT / "data/scvae_reference/analyses_s0_model")[0])
clusters = reference.cluster_ids
for path in sys.argv[1:]:
    folder = Path(path)
    hierarchy = Hierarchy.from_dict(json.loads((folder / "config.json").read_text())["hierarchy"])
    obs = anndata.read_h5ad(folder / "outputs.h5ad", backed="r").obs
    obs = obs[obs["split"] == "validation"]
    cells = obs.index.intersection(clusters.index)
    truth = hierarchy.level_labels(obs.loc[cells, hierarchy.label_column].astype(str).to_numpy())
    predicted = np.asarray(clusters.loc[cells].astype(str).to_numpy(), dtype=str)
    aris = [adjusted_rand_score(truth[:, l], predicted) for l in range(truth.shape[1])]
    f1 = hungarian_f1(truth[:, -1], predicted)["weighted"]
    print(f"original scVAE on {folder.name} validation cells ({len(cells)} of {len(obs)}): ARI "
          f"{' / '.join(f'{a:.2f}' for a in aris)}  L4 wF1 {f1:.2f}")
