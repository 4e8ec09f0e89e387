"""Screen (2026-12-05, eighth stop): would the final refit's clustering of a finished unsupervised TreeVAE run
be better with a one-leaf slot left empty, and can a label-free signal tell when and which?
For each run: the training cells' latent (outputs.h5ad X_scvae, the encoder means), the model's
own final-refit settings; tree_clustering at the leaf level with no slot empty and with each
one-leaf slot (a leaf alone in its class at some level above it) empty. Printed per candidate:
ARI per level on the training cells, the smallest leaf self-link share (15-NN), the placement's
graph score (mean within-class link share over levels 2..L-1). Lines appended to empty_slots.jsonl.

    python analyses/tuning/tree/empty_slot_screen.py runs/partial/unsupervised_kang2018_s6 ...

(the unsupervised runs of analyses/partial_labels/run.py; NOTES.md, "Which slot to leave empty").
Runs saved at commit 99f8849 carry a reverted option (label_grouping); it is dropped on loading."""
import json
import os
import sys

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
import anndata  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

import scvae_hier.tree_clustering as tree  # noqa: E402
from scvae_hier.models.tree import TreeVAE  # noqa: E402
from scvae_hier.runs import load_model  # noqa: E402
from scvae_hier.tree_shape import leaf_ancestors  # noqa: E402

_init = TreeVAE.__init__


def _init_without_reverted_options(self, *args, label_grouping=None, **kwargs):  # runs saved at 99f8849
    _init(self, *args, **kwargs)


TreeVAE.__init__ = _init_without_reverted_options
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "empty_slots.jsonl")  # a rerun skips its lines


def one_leaf_slots(ancestors):
    """Leaves alone in their class at some level above the leaf level."""
    lone = set()
    for row in ancestors[:-1]:
        classes, counts = np.unique(row, return_counts=True)
        lone |= {int(np.flatnonzero(row == c)[0]) for c in classes[counts == 1]}
    return sorted(lone)


def self_links(latent, leaf, n_leaves):
    links = tree.leaf_links(latent, leaf, n_leaves)
    # links is symmetric (i->j plus j->i); a leaf's share of its own links
    return np.diag(links) / np.maximum(links.sum(axis=1), 1e-12)


def graph_score(latent, leaf, ancestors, n_leaves):
    links = tree.leaf_links(latent, leaf, n_leaves)
    return float(tree._graph_scores(links, ancestors, np.arange(n_leaves)[None])[0])


done = set()
if os.path.exists(OUT):
    done = {(r["run"], str(r["empty"])) for r in map(json.loads, open(OUT))}
for run in sys.argv[1:]:
    a = anndata.read_h5ad(f"{run}/outputs.h5ad")
    a = a[a.obs["split"] == "train"]
    latent = np.asarray(a.obsm["X_scvae"], "float64")
    model = load_model(run)
    parents, n_leaves = model.parents, model.level_sizes[-1]
    ancestors = leaf_ancestors(parents, n_leaves)
    truth = [a.obs[f"level_{l}"].astype(str).to_numpy() for l in range(1, len(ancestors) + 1)]
    for empty in [None] + one_leaf_slots(ancestors):
        if (run, str(empty)) in done:
            continue
        leaf = tree.tree_clustering(latent, parents, n_leaves, 1, model.seed, model.final_refit_clusters,
                                    placement=model.leaf_placement, grouping_decay=model.grouping_decay,
                                    top_level_decay=model.top_level_decay, top_level=model.top_level_split,
                                    empty_leaves=() if empty is None else [empty])
        ari = [round(adjusted_rand_score(t, ancestors[l][leaf]), 4) for l, t in enumerate(truth)]
        shares = self_links(latent, leaf, n_leaves)
        used = np.bincount(leaf, minlength=n_leaves) > 0
        row = {"run": run, "empty": empty, "ari": ari, "min_self_share": round(float(shares[used].min()), 3),
               "self_shares": [round(float(s), 3) for s in shares],
               "graph": round(graph_score(latent, leaf, ancestors, n_leaves), 4)}
        print(json.dumps(row), flush=True)
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")
