"""How well do a hierarchical run's own per-level clusters nest (validation cells)? For each
level l > 1: the share of cells whose level-(l-1) cluster is the modal parent of their level-l
cluster (1.0: the model's clusters form a tree, whatever tree it is).

    python analyses/tuning/nesting.py RUN [RUN ...]
"""
import sys

import anndata
import pandas as pd

for path in sys.argv[1:]:
    obs = anndata.read_h5ad(f"{path}/outputs.h5ad", backed="r").obs
    obs = obs[obs["split"] == "validation"]
    columns = sorted(c for c in obs.columns if c.startswith("scvae_level_") and c.endswith("_cluster"))
    shares = []
    for parent, child in zip(columns, columns[1:]):
        table = pd.crosstab(obs[child], obs[parent])
        shares.append(f"{table.max(axis=1).sum() / table.values.sum():.3f}")
    print(f"{path.rstrip('/').split('/')[-1]}: nesting of its own clusters at levels 2..L: {', '.join(shares)}")
