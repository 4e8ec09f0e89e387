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
from sklearn.metrics import adjusted_rand_score as ari
import scvae_hier.models.tree as T
from scvae_hier.refit import refit_run

def small_leaves(counts, assignments, n_leaves, share=0.05):
    held = np.stack([np.bincount(a, weights=counts, minlength=n_leaves) for a in assignments])
    return (held < share * counts.sum() / n_leaves).sum(axis=1)

T.small_leaves = small_leaves
src = textwrap.dedent(inspect.getsource(T.assign_to_tree))
old = "- weight * _label_penalty(penalty, a))"
assert old in src
src = src.replace(old, "- weight * _label_penalty(penalty, a) - weight * small_leaves(counts, a, n_leaves))")
exec(compile(src, "patched", "exec"), T.__dict__)

def test_aris(run):
    a = ad.read_h5ad(Path(run) / "outputs.h5ad")
    t = (a.obs["split"] == "test").to_numpy()
    return [round(ari(a.obs[f"level_{l}"][t].astype(str), a.obs[f"scvae_level_{l}_cluster"][t].astype(str)), 4) for l in range(1, 5)]

for run in map(Path, sys.argv[1:]):
    target = run.parent / f"{run.name}_minleaf"
    if not (target / "outputs.h5ad").exists():
        refit_run(run, target, log=lambda *a: None, overwrite=True)
    sizes = np.bincount(ad.read_h5ad(target / "outputs.h5ad").obs["scvae_level_4_cluster"].astype(int))
    print(json.dumps({"run": str(run), "as_run": test_aris(run), "min_leaf": test_aris(target),
                      "smallest_leaf": int(sizes.min())}), flush=True)
