"""Build data/pbmc.h5ad: the shipped PBMC counts with hierarchy levels derived from the labels.

    python data/build_pbmc.py --source PATH [--hierarchy TSV] [--output data/pbmc.h5ad]

Keeps all cells, the raw integer counts (CSR int32) and every original obs/var column; adds
obs level_1..level_4 from obs['source_library'] via the hierarchy table, the hierarchy itself
in uns['hierarchy'] and where the file came from in uns['provenance'].
"""
import argparse
import datetime
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from scvae_hier.data import file_checksum, validate_counts  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402



def build(source, hierarchy_file, output):
    source = Path(source)
    if not source.is_file():
        sys.exit(f"error: source file {source} not found. It is "
                 f"zheng2017_purified_pbmc_merged3sources.h5ad (see data/README.md); "
                 f"pass its location with --source PATH.")
    hierarchy = Hierarchy.from_file(hierarchy_file)
    adata = anndata.read_h5ad(source)
    validate_counts(adata.X, "source counts")
    adata.X = sp.csr_matrix(adata.X, dtype=np.int32)

    labels = adata.obs[hierarchy.label_column].astype(str).to_numpy()
    hierarchy.validate(labels)
    hierarchy = hierarchy.restrict(labels)
    level_labels = hierarchy.level_labels(labels)
    for l, name in enumerate(hierarchy.levels):
        adata.obs[name] = pd.Categorical(level_labels[:, l], categories=hierarchy.classes(l))

    adata.uns["hierarchy"] = hierarchy.to_dict()
    adata.uns["provenance"] = {
        "source_file": source.name,
        "source_sha256": file_checksum(source),
        "hierarchy_file": Path(hierarchy_file).name,
        "script": "data/build_pbmc.py",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(output, compression="gzip")
    print(f"wrote {output}: {adata.n_obs} cells x {adata.n_vars} genes, "
          f"{output.stat().st_size / 1e6:.1f} MB; hierarchy sizes {hierarchy.sizes}")
    return adata


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True,
                        help="zheng2017_purified_pbmc_merged3sources.h5ad (data/README.md says where it comes from)")
    parser.add_argument("--hierarchy", default=str(REPO / "data" / "pbmc_hierarchy.tsv"))
    parser.add_argument("--output", default=str(REPO / "data" / "pbmc.h5ad"))
    args = parser.parse_args(argv)
    build(args.source, args.hierarchy, args.output)


if __name__ == "__main__":
    main()
