"""Score finished tuning runs: validation and test ARI per level of each run's own nested clusters,
and the finest level's weighted F1 (the experiment's, after the Hungarian mapping) as a fifth figure.

    python analyses/tuning/tree/score_runs.py 'pbmc_f?_w0' 'pbmc_f?_w0_n_genes1000'

Each argument is a glob of run folders under /work/tree_runs (made by `restarts.py train`); a line
per run, then the mean (and min) over the finished runs of each pattern. Settings are compared on
validation cells; test cells are printed only to report the chosen one.
"""
import sys

import numpy as np
from sklearn.metrics import adjusted_rand_score

from scvae_hier.metrics import hungarian_f1

from restarts import RUNS, run_predictions


def scores(folder):
    """{'validation': [ARI per level, finest weighted F1], 'test': [...]} of the run's own nested clusters."""
    run = run_predictions(folder)
    truth = run["hierarchy"].level_labels(run["labels"])
    result = {}
    for part in ("validation", "test"):
        cells = run["split"] == part
        result[part] = [float(adjusted_rand_score(truth[cells, level], run["nested"][level][cells]))
                        for level in range(truth.shape[1])]
        result[part].append(hungarian_f1(truth[cells, -1], run["nested"][-1][cells])["weighted"])
    return result


def show(values):
    return " / ".join(f"{value:.2f}" for value in values)


def main(patterns):
    for pattern in patterns:
        finished = [folder for folder in sorted(RUNS.glob(pattern)) if (folder / "metrics.json").exists()]
        table = {folder.name: scores(folder) for folder in finished}
        for name, score in table.items():
            print(f"{name:<36} validation {show(score['validation'])}   test {show(score['test'])}")
        if table:
            for part in ("validation", "test"):
                values = np.array([score[part] for score in table.values()])
                print(f"{pattern} ({len(table)} runs) {part}: mean {show(values.mean(0))}, min {show(values.min(0))}")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
