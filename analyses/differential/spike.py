"""What the model's differential expression cannot see: a change of single genes that the cells'
latent does not carry. One annotated class is split into random halves; in half B, 50 random
model genes (at least 0.5 counts per 10,000 in the class) are thinned to half their counts, so
half A holds twice as much of them and nothing else differs. The trained model is applied as it
is (the encoder reads the changed counts); scanpy's Wilcoxon on the same cells beside it.

    python analyses/differential/spike.py RUN DATA.h5ad COLUMN CLASS    # a line to spike.txt
"""
import argparse
from pathlib import Path

import anndata
import numpy as np
import scanpy as sc
import scipy.sparse as sp

import scvae_hier as sh

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("column")
    parser.add_argument("name")
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    adata = anndata.read_h5ad(args.data)
    model = sh.load(args.run, adata=adata)
    genes = model.module.metadata["genes"]
    cells = np.flatnonzero(adata.obs[args.column] == args.name)
    counts = sp.csr_matrix(adata.X).astype(np.int64).tocsc()
    totals = np.asarray(counts[cells].sum(axis=1)).ravel()
    columns = adata.var_names.get_indexer(genes)
    per_10k = np.asarray(counts[cells][:, columns].multiply(1e4 / totals[:, None]).mean(axis=0)).ravel()
    spiked = rng.choice(columns[per_10k >= 0.5], args.genes, replace=False)
    in_a = rng.random(len(cells)) < 0.5
    thinned = counts.tolil()
    for gene in spiked:
        for cell in cells[~in_a]:
            thinned[cell, gene] = rng.binomial(int(thinned[cell, gene]), 0.5)
    adata.X = sp.csr_matrix(thinned, dtype=np.float32)
    half = np.full(adata.n_obs, None, dtype=object)
    half[cells] = np.where(in_a, "A", "B")
    adata.obs["half"] = half
    truth = set(adata.var_names[spiked])

    de = model.differential_expression("half", "A", group2="B", adata=adata)
    model_called = set(de.index[de["is_de_fdr"]])
    logged = adata[cells].copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    logged = logged[:, genes].copy()
    sc.tl.rank_genes_groups(logged, "half", groups=["A"], reference="B", method="wilcoxon")
    wilcoxon = sc.get.rank_genes_groups_df(logged, group="A").set_index("names")
    scanpy_called = set(wilcoxon.index[(wilcoxon["pvals_adj"] < 0.05) & (wilcoxon["logfoldchanges"].abs() > 0.25)])
    line = (f"{Path(args.data).stem} {args.name} ({len(cells)} cells), {args.genes} genes x2 in half A, seed "
            f"{args.seed}: model called {len(model_called)} ({len(model_called & truth)} spiked), median LFC of the "
            f"spiked {np.median(de.loc[list(truth), 'lfc_mean']):.2f}; scanpy Wilcoxon called {len(scanpy_called)} "
            f"({len(scanpy_called & truth)} spiked), median log2 FC {np.median(wilcoxon.loc[list(truth), 'logfoldchanges']):.2f}")
    print(line)
    with (HERE / "spike.txt").open("a") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()
