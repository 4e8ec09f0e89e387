"""Where a MixtureVAE training step's time goes: one compiled step, its forward pass alone, and
the step with the count law's lgamma terms left out (a lower bound for any faster lgamma form), and
the step with its reparameterisation noise drawn by TensorFlow's default "auto_select" generator
rather than by Philox (models.base.NOISE_ALGORITHM; under XLA on CPU the default is slower).

scVAE's settings (benchmarks/scvae_speed.py): its pbmc9.loom, 8,391 cells x 500 genes, K=9,
latent 20, hidden 100 100, batch 128, per-cell dispersion. Each variant is `model.train_step`
(or the forward loss) in a tf.function, XLA on unless --xla off, traced with an unknown batch size
as Keras does; the variants' steps are interleaved on the same batches, so other jobs slow all
alike. Prints median milliseconds per step.

    python benchmarks/step_breakdown.py --steps 40
"""
import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loom", default=str(ROOT / "data" / "scvae_reference" / "pbmc9.loom"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--xla", default="on", choices=["off", "on"])
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from scvae_hier.data import CountBatches, prepare, read_counts
    from scvae_hier.models import MixtureVAE, base

    prepared = prepare(read_counts(args.loom), n_genes=0)
    batches = CountBatches(prepared.X, 128, shuffle=True, seed=0)
    xs = [tf.constant(batches[i]["counts"]) for i in range(8)]
    xla = args.xla == "on"

    def new_model(without_lgamma=False):
        keras.utils.set_random_seed(0)
        model = MixtureVAE(prepared.n_vars, n_components=9, latent_dim=20, hidden=(100, 100), dispersion="cell")
        model.build()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
        model.optimizer.build(model.trainable_variables)
        if without_lgamma:
            model.decoder.fused_lgamma = False
            model.decoder.lgamma_ratio_sum = lambda x, r, batch_cells: tf.zeros(tf.shape(r)[:2])
        return model

    model, bare, auto = new_model(), new_model(without_lgamma=True), new_model()
    spec = [tf.TensorSpec([None, prepared.n_vars], tf.float32)]
    variants = {
        "training step (as fit runs it)": model.train_step,
        "forward pass only (loss)": lambda x: tf.reduce_mean(model.terms(x, training=True)["loss"]),
        "training step without the lgamma terms": bare.train_step,
        "training step, noise by 'auto_select'": auto.train_step,
    }
    compiled = {name: tf.function(fn, jit_compile=xla, input_signature=spec) for name, fn in variants.items()}
    philox = base.NOISE_ALGORITHM
    for name, fn in compiled.items():  # the generator is read when the step is traced
        base.NOISE_ALGORITHM = "auto_select" if "auto_select" in name else philox
        tf.nest.map_structure(lambda v: v.numpy(), fn(xs[0]))
    base.NOISE_ALGORITHM = philox
    times = {name: [] for name in compiled}
    for step in range(args.steps):
        order = list(compiled) if step % 2 == 0 else list(compiled)[::-1]
        for name in order:
            start = time.perf_counter()
            tf.nest.map_structure(lambda v: v.numpy(), compiled[name](xs[step % len(xs)]))
            times[name].append(1e3 * (time.perf_counter() - start))
    print(f"{prepared.n_obs} cells x {prepared.n_vars} genes, K=9, batch 128, XLA {args.xla}, "
          f"{len(batches)} steps per epoch")
    for name, ms in times.items():
        print(f"{name:<42} {np.median(ms):7.1f} ms/step  ({np.median(ms) * len(batches) / 1e3:.2f} s per epoch)")


if __name__ == "__main__":
    main()
