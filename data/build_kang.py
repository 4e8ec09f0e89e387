"""Build data/kang2018.h5ad: Kang et al. 2018's control PBMCs with the hierarchy in uns.

    python data/build_kang.py --source PATH [--output data/kang2018.h5ad]

Keeps every cell and gene with its raw integer counts (CSR int32), obs 'cluster_id' (the
authors' 8 types), 'sample_id' (8 donors, the batch) and level_1..level_4, and stores the
hierarchy (label column cluster_id) in uns['hierarchy'], so `scvae-hier train data/kang2018.h5ad
--batch-key sample_id` needs no other file. Source and licence: data/README.md.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from scvae_hier.hierarchy import Hierarchy  # noqa: E402

LEVELS = ["level_1", "level_2", "level_3", "level_4"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True,
                        help="kang2018_pbmc.h5ad, the muscat subset of GSE96583 (data/README.md says where it comes from)")
    parser.add_argument("--output", default=str(REPO / "data" / "kang2018.h5ad"))
    args = parser.parse_args()
    adata = anndata.read_h5ad(args.source)
    adata.X = sp.csr_matrix(adata.X, dtype=np.int32)
    hierarchy = Hierarchy.from_obs(adata.obs, LEVELS, label_column="cluster_id")
    hierarchy.validate(adata.obs["cluster_id"].astype(str).to_numpy())
    adata.uns["hierarchy"] = hierarchy.to_dict()
    adata.uns["provenance"] = {"source": "Kang et al. 2018 (GSE96583, batch 2, controls), via muscat's SCE",
                               "built_by": "data/build_kang.py"}
    adata.write_h5ad(args.output, compression="gzip")
    print(f"wrote {args.output}: {adata.n_obs} cells x {adata.n_vars} genes, hierarchy sizes {hierarchy.sizes}")


if __name__ == "__main__":
    main()
