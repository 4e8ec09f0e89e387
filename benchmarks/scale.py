"""Scale benchmark: one out-of-core training epoch on synthetic cells at growing sizes.

    python benchmarks/scale.py --sizes 10000 100000 1000000

For each size it writes (once, in chunks, into --folder) seeded negative-binomial counts with a
known 2/4/8 hierarchy (scvae_hier.synthetic: 2,400 genes, of which seurat_v3 keeps 2,000), then
trains each model for one epoch with `--out-of-core on` in a child process, through the same
`training.train` pipeline as `scvae-hier train`. Each row gives the pipeline's stage times (read:
opening the file and its checksum; statistics and gene selection: the two streaming passes;
store: writing the chosen genes; training: the epoch with its validation pass; outputs: naming
clusters and writing outputs.h5ad in chunks), the steady training speed (training cells per
second from the end of step 2 to the end of the last full batch: the first step compiles, and
so does the last, smaller batch), and the child's peak resident memory.

Rows are appended to --results as each run finishes, and a run whose row is already there is
skipped, so an interrupted benchmark keeps its rows and continues where it stopped. The table
of every row in --results is printed at the end.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAMES = {"mixture": "MixtureVAE", "momix": "MoMixVAE scalable"}


def time_training() -> dict:
    """Make `training.train` record the end time of every training step and the start and end
    of every epoch (validation included) in the returned lists. train() takes no extra
    callbacks, so this extends the KL warm-up callback it builds."""
    from scvae_hier import training

    times = {"steps": [], "epochs": []}
    base = getattr(training.KLWarmUp, "untimed", training.KLWarmUp)  # a second call times afresh

    class TimedWarmUp(base):
        untimed = base

        def on_epoch_begin(self, epoch, logs=None):
            super().on_epoch_begin(epoch, logs)
            times["epochs"].append([time.perf_counter(), None])

        def on_train_batch_end(self, batch, logs=None):
            times["steps"].append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            times["epochs"][-1][1] = time.perf_counter()

    training.KLWarmUp = TimedWarmUp
    return times


def child(path, model, output, n_genes, dispersion):
    """One training run in this process; prints a RESULT line with its figures."""
    import resource

    import keras

    from scvae_hier import training
    from scvae_hier.options import TrainOptions

    steps = time_training()["steps"]
    keras.config.disable_interactive_logging()
    options = TrainOptions(data=str(path), model=model, output=str(output), n_genes=n_genes, epochs=1, warm_up=0,
                           dispersion=dispersion, out_of_core="on", overwrite=True, seed=0)
    peaks = []  # peak RSS so far at each message: the one before training is the preparation's

    def log(message):
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(message, flush=True)

    run = training.train(options, log=log)
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    n_train = config["split_counts"]["train"]
    batch = options.batch_size
    # Steady speed: from the end of step 2 to the end of the last full batch, leaving out the
    # first step's compilation and the last, smaller batch (XLA compiles its shape anew).
    steady_cells = (len(steps) - 3) * batch
    steady_seconds = steps[-2] - steps[1]
    result = {"cells": config["n_cells"], "model": model, "genes": len(config["genes"]), "train_cells": n_train,
              "dispersion": dispersion, "batch_size": batch, "stages": metrics["stage_seconds"],
              "seconds": metrics["seconds"], "steady_cells_per_s": steady_cells / steady_seconds,
              "steps": len(steps), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "peak_rss_before_training_bytes": peaks[0],
              "store_bytes": sum(f.stat().st_size for f in (run / "counts").iterdir()),
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    print("RESULT " + json.dumps(result), flush=True)
    return result


def synthetic_file(folder, n_cells, n_genes_file):
    """The size's data file, written once (and its writing time)."""
    from scvae_hier import synthetic

    path = Path(folder) / f"synthetic-{n_cells}x{n_genes_file}.h5ad"
    if path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    synthetic.write_h5ad(path, n_cells, n_genes_file, seed=0)
    return path, time.time() - started


def read_rows(results):
    results = Path(results)
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def table(rows) -> str:
    lines = ["| cells | model | read (s) | gene statistics + selection (s) | store (s) | training epoch (s) | "
             "outputs (s) | training cells / s | vs 10k | peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    smallest = {}
    for row in sorted(rows, key=lambda r: (r["model"], r["cells"])):
        smallest.setdefault(row["model"], row["steady_cells_per_s"])
        s = row["stages"]
        lines.append(f"| {row['cells']:,} | {MODEL_NAMES.get(row['model'], row['model'])} | {s['read']:.1f} | "
                     f"{s['gene_statistics'] + s['gene_selection']:.1f} | {s['store'] + s.get('outliers', 0):.1f} | "
                     f"{s['train']:.1f} | {s['outputs']:.1f} | {row['steady_cells_per_s']:.0f} | "
                     f"{row['steady_cells_per_s'] / smallest[row['model']]:.2f} | "
                     f"{row['peak_rss_bytes'] / 2 ** 30:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10000, 100000, 1000000])
    parser.add_argument("--models", nargs="+", default=["mixture", "momix"], choices=sorted(MODEL_NAMES))
    parser.add_argument("--genes-in-file", type=int, default=2400)
    parser.add_argument("--n-genes", type=int, default=2000, help="genes kept by seurat_v3")
    parser.add_argument("--dispersion", default="gene", choices=["cell", "gene"])
    parser.add_argument("--folder", default="/tmp/scvae-scale", help="data files and run folders")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "scale_results.jsonl"))
    parser.add_argument("--child", nargs=3, metavar=("DATA", "MODEL", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, args.n_genes, args.dispersion)
        return 0
    done = {(r["cells"], r["model"], r["dispersion"]) for r in read_rows(args.results)}
    for n_cells in args.sizes:
        path, seconds = synthetic_file(args.folder, n_cells, args.genes_in_file)
        if seconds is not None:
            print(f"Wrote {path} in {seconds:.0f} s ({path.stat().st_size / 2 ** 30:.2f} GiB).", flush=True)
        for model in args.models:
            if (n_cells, model, args.dispersion) in done:
                print(f"{n_cells} cells, {model}: already in {args.results}, skipped.")
                continue
            output = Path(args.folder) / f"run-{n_cells}-{model}"
            command = [sys.executable, __file__, "--child", str(path), model, str(output),
                       "--n-genes", str(args.n_genes), "--dispersion", args.dispersion]
            print(f"{n_cells} cells, {model}: training one epoch ...", flush=True)
            completed = subprocess.run(command, capture_output=True, text=True)
            results = [line[len("RESULT "):] for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not results:
                print(completed.stdout[-3000:], completed.stderr[-3000:], sep="\n")
                raise SystemExit(f"the run of {model} on {n_cells} cells failed (exit {completed.returncode})")
            with open(args.results, "a") as handle:
                handle.write(results[0] + "\n")
            print(table([json.loads(results[0])]).splitlines()[-1], flush=True)
    print(table(read_rows(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
