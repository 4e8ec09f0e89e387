"""Marker genes (`--markers`): parsing and refusals, the cells' scores against scanpy's
log-normalisation by hand, the placement's violation count against a loop over leaf pairs, leaves
placed by markers where distances and links say otherwise, and a run end to end on real cells."""
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from scvae_hier.data import DataError, prepare
from scvae_hier.hierarchy import Hierarchy
from scvae_hier.markers import genes_of, parse, resolve, scores
from scvae_hier.models import TreeVAE
from scvae_hier.tree_shape import leaf_ancestors
from scvae_hier.tree_clustering import (high_group, marker_relatives, marker_violations, permutation_blocks,
                                    marker_sides, place_leaves, regroup_by_markers,
                                    tree_clustering)
from scvae_hier.options import TrainOptions

PBMC_PARENTS = [[0, 1, 1, 1], [0, 1, 2, 3, 3], [0, 1, 2, 3, 3, 3, 3, 4, 4]]   # Stem (CD34 alone) / the rest


def test_parse_reads_class_equals_genes_and_refuses_bad_sets():
    assert parse(["CD8 T=CD8A,CD8B", " B cell = MS4A1 "]) == {"CD8 T": ["CD8A", "CD8B"], "B cell": ["MS4A1"]}
    assert parse({"NK": "GNLY"}) == {"NK": ["GNLY"]}
    assert genes_of(["A=G1,G2", "B=G2,G3"]) == ["G1", "G2", "G3"]
    for bad, message in ((["CD8A,CD8B"], "CLASS=GENE"), (["=CD8A"], "CLASS=GENE"), (["CD8 T="], "has no genes"),
                         (["T=A", "T=B"], "twice")):
        with pytest.raises(ValueError, match=message):
            parse(bad)
    with pytest.raises(ValueError, match="--markers is a TreeVAE option"):
        TrainOptions(data="x.h5ad", model="mixture", markers=["T=CD3E"])
    with pytest.raises(ValueError, match="CLASS=GENE"):
        TrainOptions(data="x.h5ad", model="tree", markers=["CD3E"])


def test_resolve_finds_the_class_at_its_level_and_the_genes_columns():
    tree = Hierarchy("label", ["l1", "l2"], {"x": ("A", "A1"), "y": ("A", "A2"), "z": ("B", "B1")})
    resolved = resolve(["A2=G3,G1", "B=G2"], tree, ["G1", "G2", "G3"])
    assert resolved == [{"level": 1, "class": tree.classes(1).index("A2"), "genes": [2, 0]},
                        {"level": 0, "class": tree.classes(0).index("B"), "genes": [1]}]
    with pytest.raises(DataError, match=r"not in the hierarchy; its classes are \['A', 'A1', 'A2', 'B', 'B1'\]"):
        resolve(["C=G1"], tree, ["G1"])
    with pytest.raises(DataError, match=r"gene\(s\) \['G9'\] of class 'A'"):
        resolve(["A=G1,G9"], tree, ["G1"])


def test_scores_are_scanpys_log_normalised_mean_over_the_markers():
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(30, 6)).astype(float)
    counts[0] = 0.0
    counts[0, 5] = 3.0                                           # a cell with no marker counts
    markers = [{"genes": [1, 3]}, {"genes": [4]}]
    expected = np.zeros((30, 2))
    for i in range(30):
        library = counts[i].sum()
        expected[i, 0] = (np.log(1 + 1e4 * counts[i, 1] / library) + np.log(1 + 1e4 * counts[i, 3] / library)) / 2
        expected[i, 1] = np.log(1 + 1e4 * counts[i, 4] / library)
    np.testing.assert_allclose(scores(counts, markers), expected, rtol=1e-12)
    np.testing.assert_allclose(scores(sp.csr_matrix(counts), markers), expected, rtol=1e-12)


def _violations_by_hand(means, classes, parents, n_leaves, assignment):
    """Pairs counted leaf by leaf: the class's leaves against the leaves of its nearest ancestor
    with more leaves (or all), outside the class."""
    ancestors = leaf_ancestors(parents, n_leaves)
    total = 0
    for m, (level, k) in zip(means, classes):
        inside = [i for i in range(n_leaves) if ancestors[level][assignment[i]] == k]
        relatives = list(range(n_leaves))
        for coarser in reversed(range(level)):
            top = ancestors[coarser][assignment[inside[0]]]
            group = [i for i in range(n_leaves) if ancestors[coarser][assignment[i]] == top]
            if len(group) > len(inside):
                relatives = group
                break
        total += sum(m[j] > m[i] for i in inside for j in relatives if j not in inside)
    return total


def test_marker_violations_match_a_count_over_leaf_pairs():
    rng = np.random.default_rng(3)
    classes = [(1, 0), (2, 4), (0, 1), (2, 2)]      # CD34 HSC (its parent Stem has no other leaf), CD8 T, Non-stem, NK
    means = rng.normal(size=(4, 9))
    assignments = np.array([rng.permutation(9) for _ in range(25)])
    counted = marker_violations(means, classes, leaf_ancestors(PBMC_PARENTS, 9), assignments)
    for assignment, value in zip(assignments, counted):
        assert value == _violations_by_hand(means, classes, PBMC_PARENTS, 9, assignment)
    # CD34 HSC is compared with every other leaf: 0 only with the highest-scoring leaf in its slot.
    best = np.argsort(-means[0])
    for rank, leaf in enumerate(best[:3]):
        assignment = np.array([(i - leaf) % 9 for i in range(9)])    # leaf `leaf` in slot 0
        assert marker_violations(means[:1], classes[:1], leaf_ancestors(PBMC_PARENTS, 9), assignment[None])[0] == rank


def four_blobs(n=80, seed=0):
    """Four blobs on a rectangle, 20 apart along x and 4 along y: distances (and the kNN graph,
    with no link between blobs) pair them by x, but the true classes pair them by y, which only a
    marker gene tells (high in blobs 0 and 2)."""
    rng = np.random.default_rng(seed)
    corners = np.array([[0.0, 0.0], [0.0, 4.0], [20.0, 0.0], [20.0, 4.0]])
    truth = np.repeat(np.arange(4), n)
    latent = corners[truth] + 0.3 * rng.normal(size=(4 * n, 2))
    marker = np.where(np.isin(truth, [0, 2]), 2.0, 0.5) + 0.3 * rng.normal(size=4 * n)
    return latent, truth, marker[:, None]


def test_markers_place_the_leaves_where_distances_and_links_do_not():
    latent, truth, marker = four_blobs()
    parents = [[0, 0, 1, 1]]
    true_class = np.isin(truth, [0, 2]).astype(int)
    without = place_leaves(latent, truth, parents, 4)
    assert adjusted_rand_score(true_class, leaf_ancestors(parents, 4)[0][without]) < 0.5
    for seed in range(3):                              # whatever order the leaves come in
        shuffled = np.random.default_rng(seed).permutation(4)[truth]
        placed = place_leaves(latent, shuffled, parents, 4, markers=(marker, [(0, 0)]))
        assert adjusted_rand_score(truth, placed) == 1.0                                   # leaves kept whole
        assert (leaf_ancestors(parents, 4)[0][placed] != 1 - true_class).sum() == 0          # marked class 0 = blobs 0, 2
    clustered = tree_clustering(latent, parents, 4, clusters_per_leaf=1, placement="graph",
                                markers=(marker, [(0, 0)]))
    assert (leaf_ancestors(parents, 4)[0][clustered] != 1 - true_class).sum() == 0


def test_markers_with_an_empty_leaf_follow_the_pruned_tree():
    """Classes renumber when a leaf is left empty; a marked class keeps its markers, and a class
    left without leaves drops its set."""
    latent, truth, marker = four_blobs()
    parents = [[0, 0, 1, 1, 2]]                        # a third class holding one leaf, left empty
    markers = (np.hstack([marker, -marker]), [(0, 0), (0, 2)])
    clustered = tree_clustering(latent, parents, 5, clusters_per_leaf=1, placement="graph", markers=markers,
                                empty_leaves=[4])
    assert not (clustered == 4).any()
    assert (leaf_ancestors(parents, 5)[0][clustered] == 0).sum() == (truth % 2 == 0).sum()
    assert adjusted_rand_score(np.isin(truth, [0, 2]), leaf_ancestors(parents, 5)[0][clustered]) == 1.0


def test_the_model_stores_its_markers_and_refuses_them_where_they_cannot_act():
    arguments = dict(level_sizes=(2, 4), parents=[[0, 0, 1, 1]], latent_dim=2, hidden=(4,))
    markers = [{"level": 0, "class": 1, "genes": [3, 5]}]
    model = TreeVAE(7, markers=markers, **arguments)
    assert TreeVAE.from_config(model.get_config()).markers == markers
    with pytest.raises(ValueError, match="leaf_placement='graph'"):
        TreeVAE(7, markers=markers, **arguments, leaf_placement="compact")
    assert TreeVAE(7, markers=markers, semi_supervised=True, **arguments).markers == markers   # labels and markers
    for wrong in ({"level": 2, "class": 0, "genes": [1]}, {"level": 0, "class": 2, "genes": [1]},
                  {"level": 0, "class": 0, "genes": [7]}):
        with pytest.raises(ValueError, match="gene columns in 0..6"):
            TreeVAE(7, markers=[wrong], **arguments)


def test_prepare_keeps_marker_genes_beside_the_highly_variable_ones(pbmc):
    cells = pbmc[::20].copy()
    plain = prepare(cells, n_genes=200, drop_empty_cells=True)
    kept = [g for g in cells.var_names if g not in set(plain.var_names)][:2]
    with_markers = prepare(cells, n_genes=200, keep_genes=kept, drop_empty_cells=True)
    assert set(with_markers.var_names) == set(plain.var_names) | set(kept)
    assert list(with_markers.var_names) == [g for g in cells.var_names if g in set(with_markers.var_names)]
    with pytest.raises(DataError, match=r"gene\(s\) \['NOT_A_GENE'\] \(marker genes"):
        prepare(cells, n_genes=200, keep_genes=["NOT_A_GENE"], drop_empty_cells=True)


def test_a_run_places_its_leaves_by_the_markers_given(pbmc_slice, tmp_path, monkeypatch):
    """End to end on real cells, from the command line: a marker gene outside the highly variable
    ones is kept, the final refit receives every training cell's marker scores (checked against
    `scores` on the run's own counts), and the leaves it places break as few marker orders as any
    placement that keeps each marked class's relatives (brute force over all 10! placements). Not
    none: how a 2-epoch latent groups this slice differs between machines, and on some no placement
    with those relatives satisfies both marker sets."""
    import json

    import anndata

    import scvae_hier.tree_clustering as tree
    from conftest import FAST
    from scvae_hier.cli import main
    seen = []
    original = tree.place_leaves

    def spy(latent, leaf, parents, n_leaves, seed=0, markers=None, conflicts=None, top_level="compact"):
        placed = original(latent, leaf, parents, n_leaves, seed, markers=markers, conflicts=conflicts, top_level=top_level)
        seen.append((markers, leaf, placed, parents, n_leaves, top_level, latent, seed))
        return placed

    monkeypatch.setattr(tree, "place_leaves", spy)
    run = tmp_path / "run"
    assert main(["train", str(pbmc_slice), "--model", "tree", *FAST, "--epochs", "2", "--output", str(run),
                 "--reseed-epochs", "1", "--markers", "CD8 T=CD8A,CD8B", "CD4 T=CD4,IL7R",
                 "--top-level-split", "compact"]) == 0
    outputs = anndata.read_h5ad(run / "outputs.h5ad")
    assert "CD4" in outputs.var_names and len(outputs.var_names) > 80     # kept beside the 80 genes
    config = json.loads((run / "config.json").read_text())
    genes = list(outputs.var_names)
    assert [m["genes"] for m in config["model_arguments"]["markers"]] == [[genes.index("CD8A"), genes.index("CD8B")],
                                                                 [genes.index("CD4"), genes.index("IL7R")]]
    with_markers = [call for call in seen if call[0] is not None]
    assert len(with_markers) == 1 and len(seen) == 2      # the epoch re-seed without them, the final refit with
    assert [call[5] for call in seen] == ["compact", "compact"]   # the flag reaches the final refit
    (marker_scores, classes), leaf, placed, parents, n_leaves, _, latent, seed = with_markers[0]
    train = (outputs.obs["split"] == "train").to_numpy()
    np.testing.assert_allclose(marker_scores, scores(outputs.X[train], config["model_arguments"]["markers"]), rtol=1e-5)
    ancestors = leaf_ancestors(parents, n_leaves)
    means = np.array([[marker_scores[leaf == k, s].mean() for k in range(n_leaves)] for s in range(len(classes))])
    slot_of = lambda points: np.array([points[leaf == k][0] for k in range(n_leaves)])  # noqa: E731
    before = slot_of(original(latent, leaf, parents, n_leaves, seed, top_level="compact"))   # without markers
    relatives = np.array([marker_relatives(ancestors, level, k) for level, k in classes])
    fewest = np.inf
    for block in permutation_blocks(n_leaves):
        kept = (relatives[:, block] == relatives[:, before][:, None]).all(axis=(0, 2))
        if kept.any():
            fewest = min(fewest, marker_violations(means, classes, ancestors, block[kept]).min())
    assert marker_violations(means, classes, ancestors, slot_of(placed)[None])[0] == fewest


def test_markers_rearrange_leaves_within_their_relatives_only():
    """A T-like line cut in two leaves (0, 1), an NK-like blob beside it (2), a B-like blob (3) and a
    myeloid blob far away (4), in the tree Lymphoid {T/NK {T {0, 1}, NK {2}}, B {3}} / Myeloid {4}.
    T's marker is highest in leaf 0 and lower in leaf 1 than in the NK blob, so T must hold leaves 0
    and 2. Swapping the NK and B blobs would break no marker order either (B's marker is the lowest)
    and keep the line whole under T, and the graph prefers it (the first version did that); it
    must not happen: which leaves lie under T/NK is the latent's call, not the marker's."""
    rng = np.random.default_rng(0)
    line = np.stack([np.linspace(0.0, 6.0, 200), np.zeros(200)], axis=1)
    blobs = np.repeat(np.array([[3.0, 2.5], [10.0, 0.0], [60.0, 0.0]]), 100, axis=0)
    latent = np.concatenate([line, blobs]) + 0.05 * rng.normal(size=(500, 2))
    truth = np.concatenate([np.repeat([0, 1], 100), np.repeat([2, 3, 4], 100)])
    marker = np.array([2.0, 0.5, 1.0, 0.0, 0.0])[truth][:, None]
    parents = [[0, 0, 1], [0, 0, 1, 2], [0, 0, 1, 2, 3]]
    ancestors = leaf_ancestors(parents, 5)
    placed = place_leaves(latent, truth, parents, 5, markers=(marker, [(2, 0)]))
    for level in range(2):                                           # the lineages stay the latent's
        assert adjusted_rand_score(ancestors[level][truth], ancestors[level][placed]) == 1.0
    assert set(placed[np.isin(truth, [0, 2])]) == {0, 1} and set(placed[truth == 1]) == {2}   # T holds 0 and 2


def test_high_group_is_the_best_two_way_split_over_every_subset():
    """The cut of pieces by mean marker score against brute force over all 2^P splits of weighted
    within-group sum of squares (the high side: the group of higher mean)."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        values, weights = rng.normal(size=8) ** 2, rng.integers(1, 50, size=8).astype(float)
        def within(mask):
            return sum((weights[m] * (values[m] - np.average(values[m], weights=weights[m])) ** 2).sum()
                       for m in (mask, ~mask) if m.any())
        splits = [np.array([(s >> i) & 1 for i in range(8)], dtype=bool) for s in range(1, 2 ** 8 - 1)]
        best = min(splits, key=within)
        if np.average(values[best], weights=weights[best]) < np.average(values[~best], weights=weights[~best]):
            best = ~best
        assert np.array_equal(high_group(values, weights), best)
    assert high_group(np.ones(5), np.ones(5)) is None


def test_markers_move_the_pieces_of_a_leaf_that_mixes_two_types():
    """Kang's CD8 T and NK cells share a leaf in every fold; moving leaves whole cannot part them.
    Tree R {X {0, 1}, Y {2}}, X marked. Type A1 (marker detected in most cells) lies in two pieces and
    two leaves under X; type A2 (detected in most) and type B (in few) lie near each other and
    share leaf 2 under Y. The pieces must cross: B alone under Y, A2 under X with a leaf of its own
    (X's leaves formed again by compactness: A1's two pieces together, A2 apart); with labels that
    keep A2 under Y, it stays; with X a top-level class (every leaf its relative), nothing moves."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [2.0, 0.0], [6.0, 0.0], [6.0, 2.0]])      # pieces A1a, A1b, A2, B
    piece = np.repeat(np.arange(4), 100)
    latent = centres[piece] + 0.2 * rng.normal(size=(400, 2))
    detected = rng.random(400) < np.array([0.9, 0.9, 0.8, 0.1])[piece]         # marker genes are sparse
    marker = (detected * (1.0 + 0.2 * np.abs(rng.normal(size=400))))[:, None]
    leaf = np.array([0, 1, 2, 2])[piece]
    parents = [[0, 0], [0, 0, 1]]                                              # R {X {0, 1}, Y {2}}
    moved = regroup_by_markers(latent, leaf, piece, parents, 3, (marker, [(1, 0)]))
    assert set(moved[piece == 3]) == {2}                                       # B alone under Y
    assert not np.isin(moved[piece < 3], 2).any()                              # A1 and A2 under X
    assert len(set(moved[piece < 2])) == 1 and set(moved[piece == 2]).isdisjoint(moved[piece < 2])
    assert np.array_equal(regroup_by_markers(latent, moved, piece, parents, 3, (marker, [(1, 0)])), moved)
    allowed = np.ones((400, 3), dtype=bool)
    allowed[piece == 2] = [False, False, True]                                 # labels keep A2 under Y
    kept = regroup_by_markers(latent, leaf, piece, parents, 3, (marker, [(1, 0)]), allowed=allowed)
    assert set(kept[piece == 2]) == {2}
    top = regroup_by_markers(latent, leaf, piece, [[0, 0, 1]], 3, (marker, [(0, 0)]))   # X a top-level class
    assert np.array_equal(top, leaf)


def test_markers_pick_between_two_parts_of_the_tree_with_the_same_shape():
    """Kang's Myeloid and Lymphoid are alike in shape (a three-leaf and a one-leaf class each), so
    the graph cannot tell which part is which and may put the T-cell leaves in the monocytes'
    slots. The marked class must then take the part where its markers are: P {C1 {0, 1}, C2 {2}} /
    Q {D1 {3, 4}, D2 {5}}, C1 marked, its marker high in group G's pair of blobs; whatever order
    the leaves come in, C1 ends up holding them."""
    rng = np.random.default_rng(0)
    corners = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 6.0], [40.0, 0.0], [41.5, 0.0], [40.0, 6.0]])
    truth = np.repeat(np.arange(6), 80)
    latent = corners[truth] + 0.3 * rng.normal(size=(480, 2))
    # in H the marker is also higher in the pair than in the single blob, so either part could hold C1
    # without a pair out of order: only how high the marker is tells them apart
    marker = np.array([2.0, 2.0, 0.2, 0.3, 0.3, 0.1])[truth][:, None] + 0.02 * rng.normal(size=(480, 1))
    parents = [[0, 0, 1, 1], [0, 0, 1, 2, 2, 3]]
    ancestors = leaf_ancestors(parents, 6)
    for seed in range(6):
        shuffled = np.random.default_rng(seed).permutation(6)[truth]
        placed = place_leaves(latent, shuffled, parents, 6, markers=(marker, [(1, 0)]))
        assert set(ancestors[1][placed[truth < 2]]) == {0}                         # C1 holds G's pair
        for level in range(2):                                                     # the grouping is the latent's
            assert adjusted_rand_score(ancestors[level][place_leaves(latent, shuffled, parents, 6)],
                                       ancestors[level][placed]) == 1.0


def test_marker_sides_keep_each_cell_on_its_side_of_every_marked_class():
    """PBMC's tree with CD34 HSC (a top-level class alone: every leaf its relative) and CD8 T (its
    relatives the six T-cell leaves) marked: the leaves each cell may take, written out by hand."""
    leaf = np.arange(9)
    sides = marker_sides(leaf, PBMC_PARENTS, 9, [(0, 0), (2, 4)])
    by_hand = {0: {0}, 1: set(range(1, 9)), 2: set(range(1, 9)), 3: {3, 4, 5, 6}, 4: {3, 4, 5, 6},
               5: {3, 4, 5, 6}, 6: {3, 4, 5, 6}, 7: {7, 8}, 8: {7, 8}}
    for k in range(9):
        assert set(np.flatnonzero(sides[k])) == by_hand[k]
    assert marker_sides(leaf, PBMC_PARENTS, 9, []).all()
