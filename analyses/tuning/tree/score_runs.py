"""ARI per level of finished runs' own nested predictions, on validation and test cells.

    python analyses/tuning/tree/score_runs.py RUN_FOLDER...

The same predictions as the experiment's (`restarts.run_predictions`: the ancestors of each
cell's most probable leaf), for runs trained by `restarts.py` outside an experiment.
"""
import sys
from pathlib import Path

from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from restarts import run_predictions  # noqa: E402

if __name__ == "__main__":
    for path in sys.argv[1:]:
        run = run_predictions(Path(path))
        truth = run["hierarchy"].level_codes(run["labels"])
        scores = {}
        for part in ("validation", "test"):
            cells = run["split"] == part
            scores[part] = " / ".join(f"{adjusted_rand_score(truth[cells, level], run['nested'][level][cells]):.3f}"
                                      for level in range(truth.shape[1]))
        print(Path(path).name, scores, flush=True)
