"""How close the graph placement's choice is, on trained runs: each run's final leaves (training
cells) go through `tree.nearest_other_grouping` (the best placement that groups them differently
at some level above the leaves, renamings excluded, and how much lower `place_leaves`' objective
scores it; negative: the refitted leaves would be placed differently, refitted_leaves.py) and
`tree.regrouped_leaves` (the fewest leaves that change class), each leaf named by the annotated
type most of its cells have. Runs trained since 2026-12-04 afternoon record the same in
metrics.json (`placement_margin`). One JSON line per run (placement_margin.jsonl).

    python analyses/tuning/tree/placement_margin.py RUN [RUN ...]
"""
import json
import sys
from pathlib import Path

import anndata

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from scvae_hier.tree_clustering import nearest_other_grouping, regrouped_leaves  # noqa: E402


def main():
    for run in map(Path, sys.argv[1:]):
        cells = anndata.read_h5ad(run / "outputs.h5ad")
        arguments = json.loads((run / "config.json").read_text())["model_arguments"]
        parents, n_leaves = arguments["parents"], int(arguments["level_sizes"][-1])
        train = (cells.obs["split"] == "train").to_numpy()
        leaf = cells.obs["scvae_level_4_cluster"].astype(int).to_numpy()[train]
        margin, other = nearest_other_grouping(cells.obsm["X_scvae"][train], leaf, parents, n_leaves,
                                               top_level=arguments["top_level_split"])
        truth = cells.obs["level_4"].astype(str).to_numpy()[train]
        names = [max(set(truth[leaf == k]), key=list(truth[leaf == k]).count) if (leaf == k).any() else "(empty)"
                 for k in range(n_leaves)]
        moved = {f"level_{level + 1}": [names[k] for k in leaves]
                 for level, leaves in regrouped_leaves(parents, n_leaves, other).items()}
        print(json.dumps({"run": str(run), "margin": round(margin, 5), "leaves_regrouped": moved}), flush=True)


if __name__ == "__main__":
    main()
