"""The two halves of benchmarks/gpu.sh (run that; it sets up the environment and the data).

    python benchmarks/gpu.py train DATA NAME EPOCHS RUNS_FOLDER [OPTION ...]
        trains each model for EPOCHS epochs on DATA (in one process, so TensorFlow starts once)
        and appends a row per model (s/epoch after the first, compiling, epoch; cells/s) to
        RUNS_FOLDER/rows.jsonl; models left when GPU_BUDGET_S seconds have passed are skipped
        and reported as such.
    CUDA_VISIBLE_DEVICES= python benchmarks/gpu.py reload RUNS_FOLDER
        reloads every run on the CPU, predicts its first cells again and compares them with the
        outputs.h5ad the GPU wrote (latent and cluster probabilities to tolerance).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import time_training  # noqa: E402

MODELS = ["vae", "mixture", "indmom", "momix", "tree"]
RELOAD_CELLS = 2048
# GPU kernels (TF32 matmuls on recent GPUs) and CPU kernels round differently
TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}
MIN_CLUSTER_AGREEMENT = 0.99


def train(data, name, epochs, runs, *extra):
    from dataclasses import fields

    import tensorflow as tf

    from scvae_hier import training
    from scvae_hier.cli import build_parser
    from scvae_hier.options import TrainOptions

    budget = float(__import__("os").environ.get("GPU_BUDGET_S", "inf"))
    started = time.time()
    gpus = tf.config.list_physical_devices("GPU")
    print(f"TensorFlow {tf.__version__} sees {len(gpus)} GPU(s): {[g.name for g in gpus]}", flush=True)
    parsed = build_parser().parse_args(["train", str(data), *extra])  # the options as the CLI reads them
    given = {f.name: getattr(parsed, f.name) for f in fields(TrainOptions)}
    rows = []
    for model in MODELS:
        if time.time() - started > budget:
            rows.append({"data": name, "model": model, "skipped": f"time budget of {budget:.0f} s spent"})
            print(f"{name} {model}: skipped (GPU_BUDGET_S={budget:.0f} s spent)", flush=True)
            continue
        times = time_training()
        options = TrainOptions(**{**given, "model": model, "output": str(Path(runs) / f"{name}-{model}"),
                                  "epochs": int(epochs), "patience": int(epochs), "overwrite": True})
        clock = time.time()
        run = training.train(options, log=lambda message: print(message, flush=True))
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        epoch_seconds = [end - begin for begin, end in times["epochs"]]
        steady = epoch_seconds[1:] or epoch_seconds
        n_train = config["split_counts"]["train"]
        row = {"data": name, "model": model, "cells": config["n_cells"], "genes": len(config["genes"]),
               "train_cells": n_train, "gpu": bool(gpus), "epochs": len(epoch_seconds),
               "first_epoch_s": epoch_seconds[0], "s_per_epoch": sum(steady) / len(steady),
               "cells_per_s": n_train / (sum(steady) / len(steady)), "run_s": time.time() - clock,
               "stage_seconds": metrics["stage_seconds"], "out_of_core": metrics["out_of_core"]}
        rows.append(row)
        print(f"ROW {json.dumps(row)}", flush=True)
    with open(Path(runs) / "rows.jsonl", "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def reload(runs):
    import anndata
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from scvae_hier.hierarchy import Hierarchy
    from scvae_hier.outputs import annotate, level_names, predict_outputs
    from scvae_hier.runs import load_model

    assert not tf.config.list_physical_devices("GPU"), "the reload check must run without a GPU"
    failures = 0
    for run in sorted(p for p in Path(runs).iterdir() if (p / "outputs.h5ad").is_file()):
        outputs = anndata.read_h5ad(run / "outputs.h5ad", backed="r")
        rows = slice(0, min(RELOAD_CELLS, outputs.n_obs))
        counts = outputs.X[rows]
        model = load_model(run)
        again = anndata.AnnData(obs=pd.DataFrame(index=outputs.obs_names[rows]))
        config = json.loads((run / "config.json").read_text())
        hierarchy = Hierarchy.from_dict(config["hierarchy"]) if config.get("hierarchy") else None
        predicted = predict_outputs(model, counts, 1024)
        annotate(again, predicted, level_names(hierarchy, predicted), model)
        report, ok = [], True
        for key, values in again.obsm.items():
            saved = np.asarray(outputs.obsm[key][rows])
            difference = float(np.max(np.abs(saved - values)))
            close = np.allclose(saved, values, **TOLERANCE)
            text = f"{key} max |GPU - CPU| {difference:.2g}"
            if key.endswith("probabilities"):
                agreement = float(np.mean(saved.argmax(axis=1) == values.argmax(axis=1)))
                close = close or agreement >= MIN_CLUSTER_AGREEMENT
                text += f", clusters agree on {agreement:.1%}"
            ok &= close
            report.append(text)
        failures += not ok
        print(f"RELOAD {run.name}: {'same outputs' if ok else 'DIFFERENT outputs'} on CPU ({'; '.join(report)})",
              flush=True)
    return failures


def summary(runs):
    rows = [json.loads(line) for line in (Path(runs) / "rows.jsonl").read_text().splitlines() if line.strip()]
    print("| data | model | cells x genes | device | first epoch (s) | s / epoch | training cells / s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['data']} | {row['model']} | | | skipped: {row['skipped']} | | |")
            continue
        print(f"| {row['data']} | {row['model']} | {row['cells']:,} x {row['genes']} | "
              f"{'GPU' if row['gpu'] else 'CPU'} | {row['first_epoch_s']:.1f} | {row['s_per_epoch']:.2f} | "
              f"{row['cells_per_s']:,.0f} |")


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "train":
        train(*arguments)
    elif command == "reload":
        sys.exit(1 if reload(*arguments) else 0)
    elif command == "summary":
        summary(*arguments)
    else:
        sys.exit(f"unknown command {command!r}: use train, reload or summary")
