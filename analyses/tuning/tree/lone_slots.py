"""Could the data say which leaf has no type to fill it? (issue 12, `empty_leaves`)

    python analyses/tuning/tree/lone_slots.py RUN_FOLDER...

Per finished run: the final refit's grouping of the train cells' latent (today's default decays, before the
EM steps) with every leaf filled, and with each one-leaf slot above the leaf level (a class with a
single leaf, e.g. Kang's B cells or megakaryocytes at level 2) left empty in turn. Prints and
appends to lone_slots.jsonl the within-class sum of squares per level (relative to every leaf
filled) and the grouping's ARI per level against the annotation. A rerun skips finished runs.
Result (NOTES.md, last section): compactness prefers emptying a level-3 slot on Kang, which does
not help level 2, so no default rule was built on it.
"""
import json
import os
import sys
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
from sklearn.metrics import adjusted_rand_score  # noqa: E402

import scvae_hier.tree_clustering as tree  # noqa: E402
from scvae_hier.choices import DEFAULT_GROUPING_DECAY, DEFAULT_TOP_LEVEL_DECAY  # noqa: E402
from scvae_hier.tree_shape import leaf_ancestors  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "lone_slots.jsonl"
sys.path.insert(0, str(HERE))
from refit import load_run  # noqa: E402


def lone_slots(ancestors):
    """Leaves that are alone in their class at some level above the leaf level."""
    return [k for k in range(ancestors.shape[1])
            if any((row == row[k]).sum() == 1 for row in ancestors[:-1])]


def main(folders):
    done = {json.loads(line)["run"] for line in OUT.read_text().splitlines()} if OUT.exists() else set()
    for folder in folders:
        name = f"{folder.parent.name}/{folder.name}"
        if name in done:
            continue
        model, loc, _, split, truth = load_run(folder)
        train = split == "train"
        latent, n_leaves = loc[train].astype("float64"), model.level_sizes[-1]
        ancestors = leaf_ancestors(model.parents, n_leaves)
        row = {"run": name, "options": []}
        for empty in [[]] + [[k] for k in lone_slots(ancestors)]:
            leaf = tree.tree_clustering(latent, model.parents, n_leaves, 1, model.seed, model.final_refit_clusters,
                                        placement=model.leaf_placement, grouping_decay=DEFAULT_GROUPING_DECAY,
                                        top_level_decay=DEFAULT_TOP_LEVEL_DECAY, empty_leaves=empty)
            within = [float(tree._within_leaves(latent, classes[leaf])) for classes in ancestors]
            aris = [round(adjusted_rand_score(truth[train][:, level], classes[leaf]), 3)
                    for level, classes in enumerate(ancestors)]
            row["options"].append({"empty": empty, "ss": within, "ari": aris})
            ratios = [round(w / base, 4) for w, base in zip(within, row["options"][0]["ss"])]
            print(name, "empty", empty, "within-class SS / every leaf filled", ratios, "ARI", aris, flush=True)
        with open(OUT, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
