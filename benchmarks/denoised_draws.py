"""Denoised expression decoded at the latent mean against averaged over S draws from q(z|x)
(`get_normalized_expression(n_samples=S)`), on a trained run: seconds for each readout (the mean
decode timed in the same process, so read the ratio) and how far the two readouts lie apart, over
every cell and gene and as marker genes' means per predicted finest class.

    python benchmarks/denoised_draws.py RUN DATA.h5ad [--batch NAME] [--genes G ...]
"""
import argparse
import time

import anndata
import numpy as np
import pandas as pd

import scvae_hier as sh

MARKERS = ["CD8A", "CD8B", "IL7R", "MS4A1", "CD14", "LYZ", "NKG7", "GNLY", "SPINK2"]


def timed(call, repeats=2):
    """(result, fewest seconds over `repeats` calls): the first call also builds TensorFlow's functions."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        best = min(best, time.perf_counter() - start)
    return out, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--batch", help="transform_batch (default: none)")
    parser.add_argument("--genes", nargs="+", default=MARKERS)
    parser.add_argument("--draws", nargs="+", type=int, default=[1, 10, 50])
    args = parser.parse_args()
    model = sh.load(args.run, adata=anndata.read_h5ad(args.data))
    expression = lambda **kw: model.get_normalized_expression(  # noqa: E731
        library_size=1e4, transform_batch=args.batch, **kw)
    at_mean, mean_seconds = timed(expression)
    finest = model.predict_levels()[f"scvae_{model.level_names[-1]}"]
    genes = [g for g in args.genes if g in at_mean.columns]
    for draws in args.draws:
        drawn, seconds = timed(lambda: expression(n_samples=draws))
        apart = np.nanmean(np.abs(drawn.to_numpy() - at_mean.to_numpy())) / np.nanmean(at_mean.to_numpy())
        print(f"{draws} draws: {seconds:.1f} s, {seconds / mean_seconds:.1f} x the latent-mean decode "
              f"({mean_seconds:.1f} s); mean |drawn - at mean| over cells and genes: {apart:.3f} of the mean share")
    per_class = pd.concat({"at mean": at_mean[genes].groupby(finest.values, observed=True).mean(),
                           f"{args.draws[-1]} draws": drawn[genes].groupby(finest.values, observed=True).mean()},
                          axis=1)
    print(per_class.round(1).to_string())


if __name__ == "__main__":
    main()
