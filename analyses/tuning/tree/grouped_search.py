"""Does the grouped placement search (`place_leaves`: one permutation per set that differs only by
exchanging interchangeable slots) pick what the search over every permutation picks, on real runs?

    python analyses/tuning/tree/grouped_search.py [--compact] RUN [RUN ...]     (from the repo root)

Each finished TreeVAE run's final refit is redone with its own settings (`refit_run`, into a
temporary folder; with --compact, with the compact top level, whose scores differ in the last bit
between exchanged slots and which the grouped search settles by rescoring the near sets); every
grouped search is run a second time over every permutation, and one line per search (same winner
or not, seconds of each) goes to grouped_search.jsonl beside this script.
The full search's winner is the one used, so a run proceeds as it did before the change."""
import json
import sys
import tempfile
import time
from pathlib import Path

import scvae_hier.tree_clustering as tree
from scvae_hier.refit import refit_run

OUT = Path(__file__).with_name("grouped_search.jsonl")
full_search = tree._best_permutation


def main(runs, compact=False):
    current = {"top_level": "compact" if compact else "own"}

    def both(k, scored, seed=0, chunk=40320, groups=None, tolerance=0.0):
        if groups is None:
            return full_search(k, scored, seed, chunk)
        clock = time.time()
        grouped = full_search(k, scored, seed, chunk, groups, tolerance)
        grouped_seconds, clock = time.time() - clock, time.time()
        full = full_search(k, scored, seed, chunk)
        line = {"run": current["run"], "top_level": current["top_level"], "leaves": k, "groups": [int(g) for g in groups],
                "same": bool((grouped == full).all()), "seconds_grouped": round(grouped_seconds, 2),
                "seconds_full": round(time.time() - clock, 2)}
        print(line, flush=True)
        with OUT.open("a") as out:
            out.write(json.dumps(line) + "\n")
        return full

    tree._best_permutation = both
    for run in runs:
        current["run"] = run
        with tempfile.TemporaryDirectory() as folder:
            changes = {"top_level_split": "compact"} if compact else {}
            refit_run(run, Path(folder) / "refit", log=lambda *_: None, **changes)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main([a for a in arguments if a != "--compact"], compact="--compact" in arguments)
