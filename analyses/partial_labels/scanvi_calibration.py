"""scANVI's class probabilities on the reference-to-query settings, scored as calibration.py scores
TreeVAE's: the peer a scvi-tools user would read instead of `predict_probabilities`.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 /work/scvi_venv/bin/python analyses/partial_labels/scanvi_calibration.py \\
        [--seeds 0 1 2]

scanvi_query.py's "scanvi" way (scVI 100 epochs then scANVI 20 on every labelled reference cell, no
batch covariate; the query predicted directly), here with `predict(soft=True)`: the call is the most
probable leaf and its ancestors (as TreeVAE calls), each level's probability the sum of the leaves
under the called class. Lines (method "scanvi") go to calibration.jsonl; a rerun skips them.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from scanvi_query import reference_model, split  # sets the thread counts, imports scvi

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from calibration_scores import rows  # noqa: E402

OUT = HERE / "calibration.jsonl"
if os.environ.get("SCANVI_SMOKE"):  # scanvi.py's quick check: 2 epochs, lines in /tmp
    OUT = Path("/tmp/scanvi_calibration_smoke.jsonl")
SETTINGS = ("query_pbmc_mudan (MUDAN)", "query_kang_2donors (1256+1488)")


def done():
    if not OUT.exists():
        return set()
    return {(r["setting"], r["seed"], r["method"]) for r in map(json.loads, OUT.read_text().splitlines())}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for setting in SETTINGS:
        name = setting.split(" ")[0]
        for seed in args.seeds:
            if (name, seed, "scanvi") in done():
                continue
            reference, query, paths, label = split(setting)
            model = reference_model(reference, seed, batch=False)
            soft = model.predict(query, soft=True)                   # cells x leaves
            leaves = [str(c) for c in soft.columns]
            leaf_paths = np.array([paths[leaf] for leaf in leaves], dtype=object)    # [leaves, L]
            p = soft.to_numpy(dtype=np.float64)
            calls = leaf_paths[p.argmax(axis=1)]                                      # [cells, L]
            probability = np.stack([(p * (leaf_paths[:, i][None, :] == calls[:, i][:, None])).sum(axis=1)
                                    for i in range(calls.shape[1])], axis=1)
            truth = np.array([paths[leaf] for leaf in query.obs[label].astype(str)], dtype=object).astype(str)
            levels = [f"level_{i + 1}" for i in range(calls.shape[1])]
            with OUT.open("a") as handle:
                for row in rows(truth, calls.astype(str), probability, levels):
                    line = {"setting": name, "query": setting.split(" ")[1].strip("()"), "seed": seed,
                            "method": "scanvi", "n_query": int(query.n_obs), "temperature": None, **row}
                    handle.write(json.dumps(line) + "\n")
                    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
