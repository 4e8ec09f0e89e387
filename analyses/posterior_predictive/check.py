"""Posterior predictive check of a trained run: per gene, the observed counts against counts drawn
from the model for the same cells (`posterior_predictive_sample`: z ~ q(z|x), x' ~ p(x|z) with
each cell's batch and total): share of zeros, mean, variance, over all cells.

    python analyses/posterior_predictive/check.py RUN DATA.h5ad [--draws 3]
"""
import argparse

import anndata
import numpy as np

import scvae_hier as sh


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    adata = anndata.read_h5ad(args.data)
    model = sh.load(args.run, adata=adata)
    genes = list(model.module.metadata["genes"])
    drawn = model.posterior_predictive_sample(adata, n_samples=args.draws, seed=0)     # [cells, genes, S]
    kept = ~np.isnan(drawn[:, 0, 0])
    observed = np.asarray(adata[kept, genes].X.todense(), dtype=np.float64)
    drawn = drawn[kept].astype(np.float64)
    rows = {
        "share of zeros": ((observed == 0).mean(axis=0), (drawn == 0).mean(axis=(0, 2))),
        "mean": (observed.mean(axis=0), drawn.mean(axis=(0, 2))),
        "variance": (observed.var(axis=0), drawn.var(axis=0).mean(axis=1)),
    }
    print(f"{kept.sum()} cells x {len(genes)} genes, {args.draws} draws per cell")
    print(f"{'per gene':<15} {'Pearson r':>9} {'median |observed - drawn|':>26} {'median drawn / observed':>24}")
    for name, (obs, pred) in rows.items():
        ratio = np.median(pred[obs > 0] / obs[obs > 0])
        print(f"{name:<15} {np.corrcoef(obs, pred)[0, 1]:>9.3f} {np.median(np.abs(obs - pred)):>26.4f} {ratio:>24.3f}")
    worst = np.argsort(-np.abs(rows["share of zeros"][0] - rows["share of zeros"][1]))[:5]
    print("largest zero-share gaps (observed / drawn): " + ", ".join(
        f"{genes[g]} {rows['share of zeros'][0][g]:.3f} / {rows['share of zeros'][1][g]:.3f}" for g in worst))


if __name__ == "__main__":
    main()
