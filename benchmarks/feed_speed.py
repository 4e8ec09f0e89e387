"""Seconds per training epoch by how the batches reach the compiled step: Keras's fit reading the
CountBatches as a PyDataset (a Python generator call per batch, what training did before), our
fit (the CountBatches as a native tf.data pipeline, CountBatches.as_dataset) and, as the floor, a
Python loop calling the compiled training step on the same batches.

scVAE's settings (benchmarks/scvae_speed.py): its pbmc9.loom, 8,391 cells x 500 genes, MixtureVAE
K=9, latent 20, hidden 100 100, batch 128, per-cell dispersion. One model per feed from the same
initial weights; the feeds take turns, --epochs epochs at a time, --rounds times, so that other
jobs slow all alike. Prints the median epoch after each fit's first (compiling) epoch.

    python benchmarks/feed_speed.py --xla on
"""
import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loom", default=str(ROOT / "data" / "scvae_reference" / "pbmc9.loom"))
    parser.add_argument("--xla", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per turn")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from scvae_hier.data import CountBatches, prepare, read_counts
    from scvae_hier.models import MixtureVAE

    prepared = prepare(read_counts(args.loom), n_genes=0)

    def new_model(xla):
        keras.utils.set_random_seed(0)
        model = MixtureVAE(prepared.n_vars, n_components=9, latent_dim=20, hidden=(100, 100), dispersion="cell")
        model.build()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
        return model

    def timed_fit(fit, model, batches):
        times = []
        stamp = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: times.append(time.perf_counter()),
                                               on_epoch_end=lambda e, logs: times.append(time.perf_counter()))
        fit(model, batches, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[stamp])
        return [end - start for start, end in zip(times[::2], times[1::2])][1:]

    def python_loop(model, batches, epochs):
        step = tf.function(model.train_step, jit_compile=model.jit_compile,
                           input_signature=[{"counts": tf.TensorSpec([None, prepared.n_vars], tf.float32)}])
        times = []
        for _ in range(epochs):
            start = time.perf_counter()
            for index in range(len(batches)):
                logs = step(batches[index])
            float(logs["loss"])
            batches.on_epoch_end()
            times.append(time.perf_counter() - start)
        return times[1:]

    feeds = {"Keras fit, PyDataset (before)": lambda m, b: timed_fit(keras.Model.fit, m, b),
             "our fit, tf.data pipeline (now)": lambda m, b: timed_fit(MixtureVAE.fit, m, b),
             "Python loop over the compiled step (floor)": lambda m, b: python_loop(m, b, args.epochs)}
    print(f"{prepared.n_obs} cells x {prepared.n_vars} genes, batch 128, "
          f"{args.rounds} turns of {args.epochs} epochs per feed")
    for xla in args.xla:
        models = {name: new_model(xla == "on") for name in feeds}
        times = {name: [] for name in feeds}
        for turn in range(args.rounds):
            for name in (list(feeds) if turn % 2 == 0 else list(feeds)[::-1]):
                batches = CountBatches(prepared.X, 128, shuffle=True, seed=turn)
                times[name] += feeds[name](models[name], batches)
        for name, seconds in times.items():
            print(f"XLA {xla:<3} {name:<44} {np.median(seconds):6.2f} s/epoch (fastest {min(seconds):.2f})",
                  flush=True)


if __name__ == "__main__":
    main()
