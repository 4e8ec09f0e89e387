"""Our MixtureVAE against the original scVAE GMVAE at equal settings, side by side in one run.

Both train on the same file (data/scvae_reference/pbmc9.loom: the nine populations, 8,391 cells
x 500 genes, every cell a training cell), K=9, latent 20, hidden 100 100, batch 128, NB
likelihood, warm-up 5, Adam 1e-3, for --epochs epochs, one after the other (never at the same
time). Reported: median (and fastest) seconds per training epoch after the first (the first includes graph
building / XLA compilation), the first epoch, peak resident memory, and the ratio to scVAE.

    python benchmarks/scvae_speed.py --epochs 10 --scvae-python /tmp/venvs/scvae37/bin/python

Our rows: per-cell NB dispersion (scVAE's, the equal-settings comparison) without and with XLA,
and gene dispersion with XLA (what analyses/poster.yaml uses).

The scVAE venv: `python3.7 -m venv V && V/bin/pip install scvae==2.1.4 protobuf==3.20.3`.
scVAE's own per-epoch time (its "Epoch N (x s)" log line) excludes its full-set evaluation.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOM = ROOT / "data" / "scvae_reference" / "pbmc9.loom"


def ours(loom: str, epochs: int, xla: bool, dispersion: str = "cell") -> dict:
    """Child process: train our MixtureVAE on every cell and time each epoch."""
    import resource

    import keras

    from scvae_hier.data import CountBatches, prepare, read_counts
    from scvae_hier.models import MixtureVAE
    from scvae_hier.training import KLWarmUp

    from epoch_speed import epoch_timer  # this folder is on sys.path when run as a script

    prepared = prepare(read_counts(loom), n_genes=0)
    model = MixtureVAE(prepared.n_vars, n_components=9, latent_dim=20, hidden=(100, 100), dispersion=dispersion)
    model.build()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
    times = []
    model.fit(CountBatches(prepared.X, 128, shuffle=True, seed=0), epochs=epochs, shuffle=False, verbose=0,
              callbacks=[KLWarmUp(5), epoch_timer(times)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"cells": int(prepared.n_obs), "genes": int(prepared.n_vars), "epochs": times, "peak_gib": peak}


def scvae(python: str, loom: Path, epochs: int) -> dict:
    """Run the original scVAE's `scvae train` and read its per-epoch times from its output."""
    scvae_bin = str(Path(python).with_name("scvae"))
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-c", _RUSAGE, scvae_bin, "train", str(loom), "-f", "loom", "-D", f"{tmp}/data",
                   "-M", f"{tmp}/models", "-m", "GMVAE", "-r", "negative_binomial", "-l", "20", "-H", "100", "100",
                   "-K", "9", "-w", "5", "-B", "128", "-e", str(epochs), "--learning-rate", "0.001"]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"scVAE failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    times = [float(t) for t in re.findall(r"^Epoch \d+ \(([\d.]+) s\):", result.stdout, re.M)]
    peak = float(re.findall(r"PEAK_GIB ([\d.]+)", result.stdout + result.stderr)[-1])
    return {"epochs": times, "peak_gib": peak}


# Runs a command as a child and prints its peak resident memory (children's maxrss).
_RUSAGE = ("import resource, subprocess, sys\n"
           "code = subprocess.call(sys.argv[1:])\n"
           "print('PEAK_GIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, flush=True)\n"
           "sys.exit(code)\n")


def summary(name, record, reference=None):
    times = record["epochs"]
    later = sorted(times[1:]) or times
    median = later[len(later) // 2]
    ratio = "" if reference is None else f"{median / reference:6.2f}"
    print(f"{name:<44} {times[0]:8.2f} {median:12.2f} {min(later):8.2f} {record['peak_gib']:10.2f} {ratio:>8}")
    return median


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--scvae-python", default="/tmp/venvs/scvae37/bin/python",
                        help="Python of a venv with scvae==2.1.4 installed")
    parser.add_argument("--loom", default=str(LOOM))
    parser.add_argument("--child", nargs=3, metavar=("EPOCHS", "XLA", "DISPERSION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ours(args.loom, int(args.child[0]), args.child[1] == "1", args.child[2])))
        return
    results = {}
    # Equal settings are scVAE's per-cell dispersion; the gene-dispersion row is what the
    # reference experiment uses (analyses/poster.yaml).
    ours_runs = {"scvae-hier MixtureVAE": ("0", "cell"), "scvae-hier MixtureVAE XLA": ("1", "cell"),
                 "scvae-hier MixtureVAE XLA, gene dispersion": ("1", "gene")}
    for label, (xla, dispersion) in ours_runs.items():
        output = subprocess.run([sys.executable, __file__, "--loom", args.loom, "--child", str(args.epochs), xla,
                                 dispersion],
                                capture_output=True, text=True, check=True).stdout
        results[label] = json.loads(output.strip().splitlines()[-1])
    results["original scVAE 2.1.4 GMVAE"] = scvae(args.scvae_python, Path(args.loom), args.epochs)
    cells = results["scvae-hier MixtureVAE"]
    print(f"{cells['cells']} cells x {cells['genes']} genes, K=9, batch 128, {args.epochs} epochs each, in sequence")
    print(f"{'model':<44} {'1st epoch':>8} {'s/epoch (med)':>12} {'fastest':>8} {'peak GiB':>10} {'vs scVAE':>8}")
    reference = summary("original scVAE 2.1.4 GMVAE", results["original scVAE 2.1.4 GMVAE"])
    for label in ours_runs:
        summary(label, results[label], reference)


if __name__ == "__main__":
    main()
