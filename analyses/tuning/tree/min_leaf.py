"""A minimum leaf size in the final refit, measured and dropped (2026-12-04; tree NOTES.md): the
grouping of k-means pieces into leaves (`assign_to_tree`, patched in this process only) penalises,
like a misplaced label, a leaf holding under 5% of an even share of the cells; each run's final
refit is redone so into RUN_minleaf on the same trained encoder. One JSON line per run: ARI on the
test cells as run and with the minimum, and the smallest leaf's size.

    python analyses/tuning/tree/min_leaf.py RUN ... >> analyses/tuning/tree/min_leaf.jsonl
"""
import inspect
import json
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np

from fragment_guard import level_aris   # also puts the repository on sys.path
import scvae_hier.tree_clustering as T  # noqa: E402
from scvae_hier.refit import refit_run  # noqa: E402


def small_leaves(counts, assignments, n_leaves, share=0.05):
    """[A] leaves holding fewer cells than `share` of an even share under each assignment of pieces to leaves."""
    held = np.stack([np.bincount(a, weights=counts, minlength=n_leaves) for a in assignments])
    return (held < share * counts.sum() / n_leaves).sum(axis=1)


T.small_leaves = small_leaves
src = textwrap.dedent(inspect.getsource(T.assign_to_tree))
old = "- weight * _label_penalty(penalty, a))"
assert old in src
src = src.replace(old, "- weight * _label_penalty(penalty, a) - weight * small_leaves(counts, a, n_leaves))")
exec(compile(src, "patched", "exec"), T.__dict__)

for run in map(Path, sys.argv[1:]):
    target = run.parent / f"{run.name}_minleaf"
    if not (target / "outputs.h5ad").exists():
        refit_run(run, target, log=lambda *a: None, overwrite=True)
    sizes = np.bincount(ad.read_h5ad(target / "outputs.h5ad").obs["scvae_level_4_cluster"].astype(int))
    print(json.dumps({"run": str(run), "as_run": level_aris(run, False), "min_leaf": level_aris(target, False),
                      "smallest_leaf": int(sizes.min())}), flush=True)
