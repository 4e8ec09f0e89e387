"""Is PBMC's level 3 lost in the leaves or in their grouping? (issue 12)

    python analyses/tuning/tree/leaf_grouping.py pbmc_f0_w0 [pbmc_f1_w0 ...] [--no-ribosomal]
    python analyses/tuning/tree/leaf_grouping.py --oracle [--refit] restart_f3_w0 pbmc_f0_w0 ...   # any run, Kang too

--oracle: for each run, the per-level ARI (all cells, then validation cells) of the model's own
nested clusters beside that of the best placement of its own leaves into the tree's leaf slots
(brute force over every permutation, scored by the mean ARI over levels on all cells): an upper
bound on what any grouping rule could give with these leaves, so a gap says the grouping loses
it, no gap says the leaves do; and beside them the label-free placement of the same leaves by the
latent's neighbour graph (`place_leaves`, TreeVAE's default since 2026-12-02). With --refit, also
the final refit's re-seed (4 k-means pieces per leaf of the training and validation cells' latent,
grouped into leaves) redone with each placement, scored on validation cells.

For a finished PBMC run of `restarts.py train F S pbmc` (the run's own leaves fixed), scores every
way of putting two of the six T-cell leaves under the two-leaf CD8 T class (the other four under
CD4 T) by label-free criteria, and prints the four best of each beside the level-3 ARI that
grouping would give: between-class sum of squares (compactness, the rule `assign_to_tree` uses)
in the model's latent, in log-normalised and in scaled expression of the run's genes and in
their 50-component PCA; and the sum over genes of how far the class's lowest leaf mean lies above
its sibling leaves' highest ("up": genes on in the class and off in its siblings; "up+down": also
the reverse), with the genes that score most. --no-ribosomal drops RPS/RPL/MT- genes first.
"""
import itertools
import sys
from pathlib import Path

import anndata
import numpy as np
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from restarts import ROOT, RUNS, run_predictions  # noqa: E402

from scvae_hier.models.supervision import hierarchy_parents  # noqa: E402
from scvae_hier.tree_clustering import place_leaves, tree_clustering  # noqa: E402
from scvae_hier.tree_shape import leaf_ancestors  # noqa: E402


def expression(folder, drop_ribosomal):
    """Log-normalised and scaled expression of the run's cells on its genes (as scanpy would)."""
    cells = anndata.read_h5ad(folder / "outputs.h5ad", backed="r")
    data = anndata.read_h5ad(ROOT / "data/pbmc.h5ad")[cells.obs_names, cells.var_names].copy()
    if drop_ribosomal:
        data = data[:, ~data.var_names.str.match(r"^(RP[SL]|MT-)")].copy()
    sc.pp.normalize_total(data)
    sc.pp.log1p(data)
    lognorm = data.X.toarray() if hasattr(data.X, "toarray") else np.asarray(data.X)
    scaled = np.clip((lognorm - lognorm.mean(0)) / np.maximum(lognorm.std(0), 1e-6), -10, 10)
    u, s, _ = np.linalg.svd(scaled - scaled.mean(0), full_matrices=False)
    return lognorm, scaled, u[:, :50] * s[:50], np.asarray(data.var_names)


def main(names, drop_ribosomal=False):
    for name in names:
        run = run_predictions(RUNS / name)
        truth = run["hierarchy"].level_labels(run["labels"])[:, 2]
        leaf = np.asarray(run["nested"][3])
        parents = np.asarray(run["hierarchy"].parent_index(3))             # level-3 class of each leaf
        t_leaves = [k for k in range(len(parents)) if parents[k] in (3, 4)]  # CD4 T (3) and CD8 T (4)
        lognorm, scaled, pca, genes = expression(RUNS / name, drop_ribosomal)
        candidates = list(itertools.combinations(t_leaves, 2))

        def grouping(cd8):
            return np.where(np.isin(leaf, cd8), 4, np.where(np.isin(leaf, t_leaves), 3, parents[leaf]))

        ari = {cd8: adjusted_rand_score(truth, grouping(cd8)) for cd8 in candidates}
        print(f"{name}: model's level-3 ARI {adjusted_rand_score(truth, run['nested'][2]):.2f}; "
              f"best grouping of its leaves {max(ari.values()):.2f} {max(ari, key=ari.get)}")
        for space, points in dict(latent=run["latent"], lognorm=lognorm, scaled=scaled, pca50=pca).items():
            centre = points.mean(0)
            score = {cd8: sum((g == k).sum() * ((points[g == k].mean(0) - centre) ** 2).sum() for k in np.unique(g))
                     for cd8, g in ((cd8, grouping(cd8)) for cd8 in candidates)}
            best = sorted(candidates, key=score.get, reverse=True)[:4]
            print(f"  compactness, {space:8s}", "  ".join(f"{c} {ari[c]:.2f}" for c in best))
        for space, points in dict(lognorm=lognorm, scaled=scaled).items():
            means = {k: points[leaf == k].mean(0) for k in t_leaves}
            for both in (False, True):
                score, top = {}, {}
                for cd8 in candidates:
                    inside = np.stack([means[k] for k in cd8])
                    outside = np.stack([means[k] for k in t_leaves if k not in cd8])
                    gap = np.maximum(0, inside.min(0) - outside.max(0))
                    if both:
                        gap = gap + np.maximum(0, outside.min(0) - inside.max(0))
                    score[cd8], top[cd8] = gap.sum(), genes[np.argsort(-gap)[:3]]
                best = sorted(candidates, key=score.get, reverse=True)[:3]
                print(f"  genes {'up+down' if both else 'up':7s} {space:8s}",
                      "  ".join(f"{c} {ari[c]:.2f} [{', '.join(top[c])}]" for c in best))


def pair_counts(table):
    """sum over cells pairs counted by a contingency table's cells, rows and columns (for ARI)."""
    comb = lambda n: n * (n - 1) / 2  # noqa: E731
    return comb(table).sum(axis=(-2, -1)), comb(table.sum(-1)).sum(-1), comb(table.sum(-2)).sum(-1)


def ari_from_tables(tables, n):
    """Adjusted Rand index of a stack of contingency tables [..., K, J] (Hubert and Arabie)."""
    index, rows, columns = pair_counts(tables)
    expected = rows * columns / (n * (n - 1) / 2)
    return (index - expected) / (0.5 * (rows + columns) - expected)


def oracle(names, chunk=20000, refit=False):
    for name in names:
        run = run_predictions(RUNS / name)
        hierarchy = run["hierarchy"]
        truth = hierarchy.level_labels(run["labels"])
        leaf = np.asarray(run["nested"][-1])
        n_leaves, n = len(hierarchy.classes(hierarchy.n_levels - 1)), len(leaf)
        slots = leaf_ancestors(hierarchy_parents(hierarchy), n_leaves)     # [L, n_leaves] class of each slot
        truth_codes = [np.unique(truth[:, level], return_inverse=True)[1] for level in range(truth.shape[1])]
        counts = [np.zeros((n_leaves, codes.max() + 1)) for codes in truth_codes]
        for table, codes in zip(counts, truth_codes):
            np.add.at(table, (leaf, codes), 1)                              # model leaf x true class
        best, best_score = None, -np.inf
        permutations = itertools.permutations(range(n_leaves))
        while True:
            block = np.array(list(itertools.islice(permutations, chunk)))  # [A, K]: slot of model leaf k
            if not len(block):
                break
            score = 0.0
            for level, table in enumerate(counts):
                classes = slots[level][block]                               # [A, K] class of each leaf
                onehot = classes[:, :, None] == np.arange(slots[level].max() + 1)   # [A, K, C]
                score = score + ari_from_tables(np.einsum("akc,kj->acj", onehot, table), n)
            if score.max() > best_score:
                best_score, best = score.max(), block[score.argmax()]
        graph = place_leaves(run["latent"], leaf, hierarchy_parents(hierarchy), n_leaves)
        if refit:  # the final refit's re-seed redone on the trained latent with each placement
            cells = np.isin(run["split"], ["train", "validation"])
            for placement in ("compact", "graph"):
                found = np.zeros(n, int)
                found[cells] = tree_clustering(run["latent"][cells], hierarchy_parents(hierarchy), n_leaves,
                                               clusters_per_leaf=4, placement=placement)
                validation = run["split"] == "validation"
                print(f"{name:24s} refit re-seed, {placement:7s} placement, validation cells: " + " / ".join(
                    f"{adjusted_rand_score(truth[validation, level], slots[level][found][validation]):.2f}"
                    for level in range(truth.shape[1])))
        for cells, where in ((slice(None), "all cells"), (run["split"] == "validation", "validation cells")):
            ari = lambda predicted: " / ".join(f"{adjusted_rand_score(truth[cells, level], predicted[level][cells]):.2f}"  # noqa: E731
                                               for level in range(truth.shape[1]))
            print(f"{name:24s} {where:17s} own clusters {ari(run['nested'])}   "
                  f"its leaves, best placement {ari([row[best][leaf] for row in slots])}   "
                  f"graph placement {ari([row[graph] for row in slots])}")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    names = [a for a in arguments if not a.startswith("--")]
    if "--oracle" in arguments:
        oracle(names, refit="--refit" in arguments)
    else:
        main(names, "--no-ribosomal" in arguments)
