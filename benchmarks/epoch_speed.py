"""Seconds per epoch and peak memory of the models on data/pbmc.h5ad, side by side in one run.

Each configuration trains in its own process (so peak memory is its own) for a few epochs on the
80% training split; the first epoch (tracing / XLA compilation) is reported separately and the
steady-state figure is the median of the later epochs. Ratios are against the first row.

    python benchmarks/epoch_speed.py                      # VAE and MixtureVAE (K=10), 500/2000 genes, XLA off/on
    python benchmarks/epoch_speed.py --hierarchical       # the 2/4/5/9 protocol: nine populations, 500 genes

Model names: vae, mixture, indmom, momix-scalable, momix-exact, each optionally suffixed with
":student-t" for Student-t prior components.
"""
import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def epoch_timer(times: list):
    """A Keras callback appending each epoch's wall seconds to `times` (keras imported lazily, so
    the parent process that only launches children stays light)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    return EpochTimer()


def measure(model: str, n_genes: int, xla: bool, epochs: int, components: int, data: str, exclude: list,
            dispersion: str = "cell") -> dict:
    """Runs in a child process: train and time epochs."""
    import keras
    import numpy as np

    from scvae_hier.data import CountBatches, prepare, read_counts, split_cells
    from scvae_hier.hierarchy import Hierarchy
    from scvae_hier.models import model_class

    adata = read_counts(data)
    hierarchy = Hierarchy.from_anndata(adata)
    prepared = prepare(adata, n_genes=n_genes, drop_empty_cells=True, label_column=hierarchy.label_column,
                       exclude_labels=exclude)
    sizes = hierarchy.restrict(prepared.obs[hierarchy.label_column].astype(str)).sizes
    split = split_cells(prepared.n_obs, seed=0)
    X = prepared.X[split == "train"]
    name, _, law = model.partition(":")
    arguments = {"prior": law} if law else {}
    arguments["dispersion"] = dispersion
    if name == "mixture":
        arguments["n_components"] = components or sizes[-1]
    elif name != "vae":
        arguments["level_sizes"] = sizes
    if name.startswith("momix"):
        name, arguments["inference"] = "momix", name.split("-")[1]
    net = model_class(name)(prepared.n_vars, **arguments)
    net.build()
    net.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
    times = []
    net.fit(CountBatches(X, 128, shuffle=True), epochs=epochs, shuffle=False, verbose=0, callbacks=[epoch_timer(times)])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model, "genes": prepared.n_vars, "xla": xla, "dispersion": dispersion, "cells": X.shape[0],
            "first_epoch_s": times[0], "epoch_s": float(np.median(times[1:])), "peak_mib": peak_mib}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "pbmc.h5ad"))
    parser.add_argument("--models", nargs="+", default=["vae", "mixture"])
    parser.add_argument("--genes", nargs="+", type=int, default=[500, 2000])
    parser.add_argument("--xla", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--dispersion", nargs="+", default=["cell"], choices=["cell", "gene"],
                        help="NB dispersion per cell (scVAE's) and/or per gene (scVI's)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--components", type=int, default=None, help="mixture K (default: finest level)")
    parser.add_argument("--exclude-labels", nargs="*", default=[])
    parser.add_argument("--hierarchical", action="store_true",
                        help="the issue-3 table: nine populations, 500 genes, XLA on, every model x prior")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    if args.hierarchical:
        args.models = [f"{m}{law}" for law in ("", ":student-t")
                       for m in ("mixture", "indmom", "momix-scalable", "momix-exact")]
        args.genes, args.xla, args.exclude_labels = [500], ["on"], args.exclude_labels or ["cd14_monocytes"]
    rows = []
    for model, genes, xla, dispersion in itertools.product(args.models, args.genes, args.xla, args.dispersion):
        job = dict(model=model, n_genes=genes, xla=xla == "on", epochs=args.epochs, dispersion=dispersion,
                   components=args.components, data=args.data, exclude=args.exclude_labels)
        result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)],
                                capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"measured {model} genes={genes} xla={xla} dispersion={dispersion}", file=sys.stderr)
    base = rows[0]["epoch_s"]
    print(f"\n{rows[0]['cells']} training cells, batch 128, {args.epochs} epochs per configuration\n")
    print("| model | genes | XLA | dispersion | first epoch (s) | s / epoch | ratio to first row | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["model"]
        print(f"| {name} | {r['genes']} | {'on' if r['xla'] else 'off'} | {r['dispersion']} | {r['first_epoch_s']:.1f} | "
              f"{r['epoch_s']:.2f} | {r['epoch_s'] / base:.2f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
