"""Milliseconds per MixtureVAE training step with the NB lgamma terms dense, at non-zero counts only, or as rising factorials.

Four variants of the sum over genes of lgamma(x + r) - lgamma(r): dense (every entry, what the
decoder computed first), per cell (each cell's non-zero genes gathered up to half the genes),
per batch (the batch's non-zero entries packed flat up to a quarter of them: the default without
XLA) and rising (distributions.rising_lgamma_ratio_sum: every entry, gather-free, no lgamma: the
default under XLA).

The variants train side by side in one process on the same real batches of data/pbmc.h5ad (cells
drawn at random, batch 128), their steps interleaved, so that other jobs on the machine slow all
alike: read the ratios and medians, not single times. Each (genes, XLA, dispersion) setting
builds one model per variant from the same initial weights, with its decoder's lgamma_ratio_sum
set to the variant. With --dispersion gene the sum is once per cell and the decoder keeps it
dense (a gather lost there by 3-12%), so those rows only show the models are alike.

    python benchmarks/count_law_speed.py                        # 500 and 2000 genes, XLA off and on, K=9
    python benchmarks/count_law_speed.py --genes 500 --xla on --dispersion cell gene --steps 60
"""
import argparse
import itertools
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def real_batches(data: str, n_genes: int, batch_size: int, n_batches: int, seed: int = 0) -> list:
    """`n_batches` batches of real cells (dense float32 [batch_size, genes]) from the h5ad file."""
    from scvae_hier.data import prepare, read_counts
    from scvae_hier.hierarchy import Hierarchy

    adata = read_counts(data)
    prepared = prepare(adata, n_genes=n_genes, drop_empty_cells=True,
                       label_column=Hierarchy.from_anndata(adata).label_column)
    X = prepared.X.toarray() if hasattr(prepared.X, "toarray") else np.asarray(prepared.X)
    rng = np.random.default_rng(seed)
    return [X[rng.choice(X.shape[0], batch_size, replace=False)].astype("float32") for _ in range(n_batches)]


def models(variants: dict, n_genes: int, components: int, dispersion: str, xla: bool) -> dict:
    """Per variant (name -> lgamma_ratio_sum function), a MixtureVAE from equal initial weights and
    its training step compiled as Keras compiles it (tf.function over train_step, XLA or not)
    without Keras's per-call overhead of train_on_batch."""
    import keras
    import tensorflow as tf

    from scvae_hier.models import MixtureVAE

    built = {}
    for name, lgamma_ratio_sum in variants.items():
        keras.utils.set_random_seed(0)
        model = MixtureVAE(n_genes, n_components=components, latent_dim=20, hidden=(100, 100), dispersion=dispersion)
        model.build()
        model.decoder.lgamma_ratio_sum = lambda x, r, batch_cells, variant=lgamma_ratio_sum: variant(x, r)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
        model.decoder.fused_lgamma = False   # the variant above, whatever the compilation
        model.optimizer.build(model.trainable_variables)
        # As Keras traces it: the batch size unknown (its data adapter makes that axis None).
        built[name] = tf.function(model.train_step, jit_compile=xla,
                                  input_signature=[tf.TensorSpec([None, n_genes], tf.float32)])
    return built


def time_steps(built: dict, batches: list, steps: int) -> dict:
    """Interleaved training steps: per variant, the first (tracing/compiling) step's seconds and the
    milliseconds of each later step."""
    first, times = {}, {name: [] for name in built}
    for name, step in built.items():
        start = time.perf_counter()
        float(step(batches[0])["loss"])
        first[name] = time.perf_counter() - start
    for step in range(steps):
        order = list(built) if step % 2 == 0 else list(built)[::-1]
        for name in order:
            x = batches[(step + 1) % len(batches)]
            start = time.perf_counter()
            float(built[name](x)["loss"])
            times[name].append(1e3 * (time.perf_counter() - start))
    return {"first_s": first, "ms": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "pbmc.h5ad"))
    parser.add_argument("--genes", nargs="+", type=int, default=[500, 2000])
    parser.add_argument("--xla", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--dispersion", nargs="+", default=["cell"], choices=["cell", "gene"])
    parser.add_argument("--components", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (after the first)")
    args = parser.parse_args()

    import tensorflow as tf

    from scvae_hier.distributions import (BATCH_SPARSE_SHARE, SPARSE_SHARE, batch_sparse_lgamma_ratio_sum,
                                          dense_lgamma_ratio_sum, rising_lgamma_ratio_sum, sparse_lgamma_ratio_sum)

    def per_cell(x, r):
        capacity = int(SPARSE_SHARE * x.shape[-1])
        fits = tf.reduce_max(tf.math.count_nonzero(x, axis=-1)) <= capacity
        return tf.cond(fits, lambda: sparse_lgamma_ratio_sum(x, r, capacity), lambda: dense_lgamma_ratio_sum(x, r))

    def per_batch(x, r):   # what lgamma_ratio_sum does first, for batches of --batch-size cells
        capacity = int(BATCH_SPARSE_SHARE * args.batch_size * x.shape[-1])
        fits = tf.math.count_nonzero(x, dtype=tf.int32) <= capacity
        return tf.cond(fits, lambda: batch_sparse_lgamma_ratio_sum(x, r, capacity), lambda: dense_lgamma_ratio_sum(x, r))

    variants = {"dense": dense_lgamma_ratio_sum, "per cell": per_cell, "per batch": per_batch,
                "rising": rising_lgamma_ratio_sum}
    print("| genes | XLA | dispersion | non-zero share | dense ms/step | per cell ms/step | per batch ms/step "
          "| rising ms/step | per batch / dense | rising / dense | first step dense / per cell / per batch / rising (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for genes in args.genes:
        batches = real_batches(args.data, genes, args.batch_size, 16)
        share = float(np.mean([np.mean(b > 0) for b in batches]))
        batches = [tf.constant(b) for b in batches]
        for xla, dispersion in itertools.product(args.xla, args.dispersion):
            result = time_steps(models(variants, genes, args.components, dispersion, xla == "on"), batches, args.steps)
            ms = {name: float(np.median(t)) for name, t in result["ms"].items()}
            first = " / ".join(f"{result['first_s'][name]:.1f}" for name in variants)
            print(f"| {genes} | {xla} | {dispersion} | {share:.2f} | {ms['dense']:.1f} | {ms['per cell']:.1f} | "
                  f"{ms['per batch']:.1f} | {ms['rising']:.1f} | {ms['per batch'] / ms['dense']:.2f} | "
                  f"{ms['rising'] / ms['dense']:.2f} | {first} |", flush=True)


if __name__ == "__main__":
    main()
