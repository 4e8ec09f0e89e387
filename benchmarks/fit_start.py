"""What it costs to start a fit: seconds to train each model kind for 1-2 epochs on 600 real
cells (tiny networks, so the time is mostly TensorFlow tracing the training and validation
steps), with the optimizer built before the first step (`training.compile_model`, shipped) against
built inside the first traced step (Keras's default without a distribution strategy, which makes
TensorFlow trace that step twice). Each measurement runs in a fresh process, the two variants
alternating; read the ratio.

    python benchmarks/fit_start.py [--repeats 2] [--epochs 2]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["VAE", "MixtureVAE", "IndMoMVAE", "MoMixVAE", "TreeVAE"]


def one_fit(model_name, variant, epochs):
    """Seconds to train one model in this process (the first TensorFlow model it builds)."""
    import anndata
    import keras
    import numpy as np
    import scipy.sparse as sp

    import scvae_hier as sh
    from scvae_hier import training

    if variant == "deferred":          # the optimizer left unbuilt, as before compile_model built it
        shipped = training.compile_model

        def compile_deferred(model, options, train_counts):
            shipped(model, options, train_counts)
            model.compile(optimizer=keras.optimizers.Adam(options.learning_rate),
                          jit_compile=model.jit_compile)
        training.compile_model = compile_deferred
    pbmc = anndata.read_h5ad(ROOT / "data" / "pbmc.h5ad")
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(pbmc.obs["source_library"] == label), 60, replace=False)
                           for label in pbmc.obs["source_library"].cat.categories])
    adata = pbmc[np.sort(rows)].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.int32)
    cls = getattr(sh, model_name)
    levels = {} if model_name == "VAE" else {"levels": ["level_1", "level_2", "level_3", "level_4"]}
    cls.setup_anndata(adata, **levels)
    model = cls(adata, n_genes=80, latent_dim=3, hidden=(16, 16))
    start = time.perf_counter()
    model.train(max_epochs=epochs, warm_up=1, batch_size=64, xla=False, progress_bar=False)
    return time.perf_counter() - start, model.get_elbo()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seconds, elbo = one_fit(*args.child, args.epochs)
        print(json.dumps({"seconds": seconds, "elbo": elbo}))
        return
    print(f"{'model':<11} {'built before (s)':>17} {'built in trace (s)':>19} {'ratio':>6}  ELBO equal")
    for model_name in MODELS:
        times = {"shipped": [], "deferred": []}
        elbos = set()
        for _ in range(args.repeats):
            for variant in times:
                out = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--child", model_name,
                                      variant], capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                times[variant].append(result["seconds"])
                elbos.add(result["elbo"])
        shipped, deferred = min(times["shipped"]), min(times["deferred"])
        print(f"{model_name:<11} {shipped:>17.1f} {deferred:>19.1f} {deferred / shipped:>6.2f}  {len(elbos) == 1}",
              flush=True)


if __name__ == "__main__":
    main()
