"""How close the graph placement's choice is: for each run's final leaves (training cells), the
best placement that groups the leaves differently at some level above the leaves (a renaming of
classes that keeps every grouping, such as Kang's two isomorphic lineages swapped, does not
count), and how much lower `place_leaves`' objective (top level first, then the graph terms,
which sum to at most levels - 2) scores it than the run's own placement. Negative: the run's
refitted leaves would be placed differently (refitted_leaves.py). Each moved leaf is named by
the annotated type most of its cells have. One JSON line per run (placement_margin.jsonl).

    python analyses/tuning/tree/placement_margin.py RUN [RUN ...]
"""
import json
import sys
from pathlib import Path

import anndata
import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import scvae_hier.models.tree as tree  # noqa: E402
from scvae_hier.models.supervision import leaf_ancestors  # noqa: E402


def same_grouping(ancestors, here, assignments):
    """[A] whether each assignment groups the leaves as `here` at every level above the leaves (classes may be renamed)."""
    same = np.ones(len(assignments), dtype=bool)
    for row in ancestors[:-1]:
        pairs = np.sort(row[here][None, :] * (row.max() + 1) + row[assignments], axis=1)
        same &= 1 + (np.diff(pairs, axis=1) != 0).sum(axis=1) == len(np.unique(row[here]))
    return same


def main():
    for run in map(Path, sys.argv[1:]):
        cells = anndata.read_h5ad(run / "outputs.h5ad")
        arguments = json.loads((run / "config.json").read_text())["model_arguments"]
        parents, n_leaves = arguments["parents"], int(arguments["level_sizes"][-1])
        train = (cells.obs["split"] == "train").to_numpy()
        leaf = cells.obs["scvae_level_4_cluster"].astype(int).to_numpy()[train]
        latent = np.asarray(cells.obsm["X_scvae"][train], float)
        ancestors = leaf_ancestors(parents, n_leaves)
        search = {}
        best_permutation = tree._best_permutation

        def capture(k, scored, seed=0, chunk=40320, groups=None, tolerance=0.0):
            search.update(scored=scored, groups=groups, tolerance=tolerance)
            return best_permutation(k, scored, seed, chunk, groups, tolerance)

        tree._best_permutation = capture
        try:
            tree.place_leaves(latent, leaf, parents, n_leaves, top_level=arguments["top_level_split"])
        finally:
            tree._best_permutation = best_permutation
        scored, here = search["scored"], np.arange(n_leaves)
        other = best_permutation(n_leaves, lambda a: np.where(same_grouping(ancestors, here, a), -np.inf, scored(a)),
                                 groups=search["groups"], tolerance=search["tolerance"])
        truth = cells.obs["level_4"].astype(str).to_numpy()[train]
        names = [max(set(truth[leaf == k]), key=list(truth[leaf == k]).count) if (leaf == k).any() else "(empty)"
                 for k in range(n_leaves)]
        moved = {}
        for level, row in enumerate(ancestors[:-1], start=1):
            # the leaves that change class once the alternative's classes are matched to the run's (most leaves shared)
            shared = np.zeros((row.max() + 1, row.max() + 1))
            np.add.at(shared, (row[here], row[other]), 1)
            matched_rows, matched_columns = linear_sum_assignment(-shared)
            match = dict(zip(matched_rows, matched_columns))
            changed = [names[k] for k in here if match[row[k]] != row[other][k]]
            if changed:
                moved[f"level_{level}"] = changed
        print(json.dumps({"run": str(run), "margin": round(float(scored(here[None])[0] - scored(other[None])[0]), 5),
                          "leaves_regrouped": moved}), flush=True)


if __name__ == "__main__":
    main()
