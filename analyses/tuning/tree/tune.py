"""Train one TreeVAE tuning run (one thread, resumable) and score its validation cells.

    python analyses/tuning/tree/tune.py NAME DATASET key=value ...

DATASET: pbmc (data/pbmc.h5ad, nine populations, the poster.yaml levers unless overridden) or
kang (data/kang2018.h5ad from data/build_kang.py, its uns['hierarchy'], batch sample_id).
Runs go to /work/tree_runs/NAME; a finished run is only re-scored.
"""
import os
import sys

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import line, score  # noqa: E402

from scvae_hier.options import TrainOptions  # noqa: E402
from scvae_hier.training import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
BASE = {
    "pbmc": dict(data=str(ROOT / "data/pbmc.h5ad"), exclude_labels=("cd14_monocytes",), batch_key="source_dataset",
                 library_size="observed", dispersion="gene", n_genes=500, usage_level_weights=(0.1, 0.1, 1.0, 1.0)),
    "pbmc-plain": dict(data=str(ROOT / "data/pbmc.h5ad"), exclude_labels=("cd14_monocytes",)),
    "kang": dict(data=str(ROOT / "data/kang2018.h5ad"),  # built by data/build_kang.py; hierarchy in uns
                 batch_key="sample_id", library_size="observed",
                 dispersion="gene", n_genes=500, usage_level_weights=(0.1, 0.1, 1.0, 1.0)),
}


def parse(value):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if "," in value:
        return tuple(parse(v) for v in value.split(","))
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


if __name__ == "__main__":
    name, dataset, *pairs = sys.argv[1:]
    settings = {**BASE[dataset], "model": "tree", "xla": False, "output": f"/work/tree_runs/{name}"}
    for pair in pairs:
        key, value = pair.split("=", 1)
        settings[key] = tuple(int(v) for v in value.split(",") if v) if key == "reseed_epochs" else parse(value)
    folder = Path(settings["output"])
    if not (folder / "metrics.json").exists():
        if (folder / "config.json").exists():
            settings["resume"] = True
        train(TrainOptions(**settings))
    row = score(folder)
    text = line(row, sum(1 for k in row if k.startswith("ari_")))
    print(text)
    with open(HERE / "validation_scores.txt", "a") as handle:
        handle.write(text + "\n")
    import json
    with open(HERE / "validation_scores.jsonl", "a") as handle:
        handle.write(json.dumps({**row, "dataset": dataset, "settings": pairs}) + "\n")
