"""TreeVAE: the ELBO against a loop over components, level posteriors as sums of leaf posteriors,
nested predictions, the IWAE against a brute-force log p(x), save/load, gradients, the
tree matching of clusters to leaves and recovery of a known two-level structure."""
import itertools
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from scipy.spatial.distance import cdist
from scipy.special import log_softmax, logsumexp
from sklearn.metrics import adjusted_rand_score
from test_hierarchical import nested_counts
from test_models import dense, nb_log_likelihood, softplus, stack_forward

from scvae_hier.hierarchy import Hierarchy
from scvae_hier.models import model_class
import scvae_hier.tree_clustering as clustering
from scvae_hier.models.supervision import path_predictions
from scvae_hier.models.tree import TreeReseeding, TreeVAE
from scvae_hier.tree_clustering import (MARKERS_FIRST, NEAR_TIE, _best_permutation, _graph_scores, _linkage_scores, _one_step_away, _placement_objective, _too_small, _tree_scores,
                                    describe_margin, fragment_classes, nearest_other_grouping, regrouped_leaves, same_grouping,
                                    assign_to_tree, coarse_first_grouping, coarse_first_weights, label_conflicts,
                                    exchanges, interchangeable_slots, least_exchange_cost, leaf_distances, leaf_links, match_to_tree, permutation_blocks, place_leaves, prune_leaves, tree_clustering)
from scvae_hier.training import KLWarmUp
from scvae_hier.tree_shape import leaf_ancestors

RNG = np.random.default_rng(0)
# The PBMC tree of nine leaves: Stem / Non-stem; CD34, B, NK, T; CD34, B, NK, CD4 T, CD8 T.
PBMC_PARENTS = [[0, 1, 1, 1], [0, 1, 2, 3, 3], [0, 1, 2, 3, 3, 3, 3, 4, 4]]
SMALL_PARENTS = [[0, 0, 1], [0, 1, 1, 2, 2]]  # 2 / 3 / 5


def small_model(**kwargs):
    arguments = dict(level_sizes=(2, 3, 5), parents=SMALL_PARENTS, latent_dim=2, hidden=(6, 5), normalisation="none",
                     input_transform="log1p", prior_probabilities="learnable")
    return TreeVAE(7, **{**arguments, **kwargs})


def by_hand(model, x, noise):
    """Encoder, components and q(c|x) in numpy."""
    h = stack_forward(model.z_stack, np.log1p(x))
    loc, scale = dense(model.z_head.loc, h), softplus(dense(model.z_head.raw_scale, h)) + 1e-4
    c = model.components
    offsets = [o.numpy() for o in c.offsets]
    ancestors = model.component_ancestors
    mu = sum(0.5 ** l * offsets[l][ancestors[l]] for l in range(len(offsets)))
    if c.own is not None:
        mu = mu + 0.5 ** len(offsets) * c.own.numpy()
    sigma = softplus(c.raw_scale.numpy()) + 1e-4
    log_pc = log_softmax(model.prior_logits.numpy())
    return loc, scale, loc + scale * noise, mu, sigma, log_pc


@pytest.mark.parametrize("per_leaf", [1, 2])
def test_elbo_matches_a_loop_over_components_normal(per_leaf):
    model = small_model(components_per_leaf=per_leaf)
    model.build()
    model.prior_logits.assign(RNG.normal(size=model.n_components).astype("float32"))
    x = RNG.poisson(3.0, size=(4, 7)).astype("float32")
    noise = RNG.normal(size=(4, 2)).astype("float32")
    terms = {k: v.numpy() for k, v in model.terms(tf.constant(x), noise=tf.constant(noise)).items()}
    loc, scale, z, mu, sigma, log_pc = by_hand(model, x, noise)
    reconstruction = nb_log_likelihood(model, x, z)
    kls = np.stack([(np.log(sigma[c] / scale) + (scale ** 2 + (loc - mu[c]) ** 2) / (2 * sigma[c] ** 2) - 0.5).sum(-1)
                    for c in range(model.n_components)], axis=1)                       # a loop over components
    log_qc = log_softmax(log_pc - kls, axis=1)                                          # the optimal q(c|x)
    q = np.exp(log_qc)
    kl_y = (q * (log_qc - log_pc)).sum(1)
    elbo = reconstruction - (q * kls).sum(1) - kl_y
    np.testing.assert_allclose(terms["elbo"], elbo, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(terms["kl_y"], kl_y, rtol=1e-4, atol=1e-5)
    # With the optimal q(c|x) the bound is log sum_c p(c) exp(-KL_c): check that identity too.
    np.testing.assert_allclose(terms["elbo"], reconstruction + logsumexp(log_pc - kls, axis=1), rtol=1e-4, atol=1e-3)
    # Per-level KLs split kl_y; the loss is the negative ELBO plus the usage penalty.
    np.testing.assert_allclose(sum(terms[f"kl_y_{l}"] for l in (1, 2, 3)), kl_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(terms["loss"], -terms["elbo"] + terms["marginal_usage"], rtol=1e-4, atol=1e-3)


def test_student_t_elbo_is_the_marginal_prior_bound():
    model = small_model(prior="student-t")
    model.build()
    x = RNG.poisson(3.0, size=(4, 7)).astype("float32")
    noise = RNG.normal(size=(4, 2)).astype("float32")
    terms = {k: v.numpy() for k, v in model.terms(tf.constant(x), noise=tf.constant(noise)).items()}
    loc, scale, z, mu, sigma, log_pc = by_hand(model, x, noise)
    df = 1 + softplus(model.components.raw_df.numpy())
    log_pz = logsumexp(np.stack([log_pc[c] + stats.t.logpdf(z, df[c], mu[c], sigma[c]).sum(-1)
                                 for c in range(model.n_components)], axis=1), axis=1)
    elbo = nb_log_likelihood(model, x, z) + log_pz - stats.norm.logpdf(z, loc, scale).sum(-1)
    np.testing.assert_allclose(terms["elbo"], elbo, rtol=1e-4, atol=1e-3)


def test_level_posteriors_are_sums_of_leaf_posteriors_and_predictions_nest():
    model = small_model(components_per_leaf=3)
    model.build()
    model.components.own.assign(RNG.normal(size=(15, 2)).astype("float32") * 3)
    x = RNG.poisson(3.0, size=(50, 7)).astype("float32")
    out = {k: v.numpy() for k, v in model.outputs(tf.constant(x)).items()}
    log_qc = model.encode(tf.constant(x))[0].numpy()
    ancestors = model.component_ancestors
    for level, k in enumerate((2, 3, 5)):
        expected = np.stack([np.exp(log_qc)[:, ancestors[level] == j].sum(1) for j in range(k)], axis=1)
        np.testing.assert_allclose(out[f"level_{level + 1}_probabilities"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[f"level_{level + 1}_probabilities"].sum(1), 1.0, rtol=1e-5)
    predictions = path_predictions([out[f"level_{l}_probabilities"] for l in (1, 2, 3)], model.parents)
    assert (predictions[2] == out["level_3_probabilities"].argmax(1)).all()
    for level, links in enumerate(model.parents):  # every cell's classes form a path of the tree
        assert (np.asarray(links)[predictions[level + 1]] == predictions[level]).all()


def test_iwae_bounds_and_converges_to_brute_force_log_likelihood():
    """One latent dimension: log p(x) = log of the integral of p(x|z) p(z) over a fine grid."""
    model = TreeVAE(3, level_sizes=(2, 3), parents=[[0, 1, 1]], latent_dim=1, hidden=(4,), normalisation="none",
                    input_transform="log1p", likelihood="poisson")
    model.build()
    model.components.offsets[0].assign(np.array([[-1.5], [1.5]], "float32"))
    # A broad proposal q(z|x) = N(0, 1.5^2) for every cell, so that 20,000 draws cover the posterior.
    for dense_layer, bias in ((model.z_head.loc, 0.0), (model.z_head.raw_scale, np.log(np.expm1(1.5)))):
        dense_layer.kernel.assign(np.zeros(dense_layer.kernel.shape, "float32"))
        dense_layer.bias.assign(np.full(dense_layer.bias.shape, bias, "float32"))
    x = RNG.poisson(2.0, size=(3, 3)).astype("float32")
    grid = np.linspace(-12, 12, 4001, dtype="float32")[:, None]
    log_pz = model.prior().log_prob(grid).numpy()
    log_px_z = np.stack([model.decoder.log_prob(tf.constant(x[i:i + 1]), model.decode(tf.constant(grid[None]),
                                                                                       tf.constant(x[i:i + 1])))
                         .numpy()[0] for i in range(3)])                               # [cells, grid]
    exact = logsumexp(log_px_z + log_pz, axis=1) + np.log(grid[1, 0] - grid[0, 0])
    elbo = np.mean([model.terms(tf.constant(x))["elbo"].numpy() for _ in range(200)], axis=0)
    def iwae(samples, seed):
        weights = model.log_importance_weights(tf.constant(x), samples, seed=(seed, 2)).numpy()
        return logsumexp(weights, axis=0) - np.log(samples)

    iwae_10 = np.mean([iwae(10, seed) for seed in range(100)], axis=0)   # its expectation, over draws
    assert np.all(elbo <= exact + 1e-3) and np.all(iwae_10 <= exact + 0.05) and np.all(iwae_10 >= elbo)
    np.testing.assert_allclose(iwae(20000, 1), exact, atol=0.05)


def test_save_and_load_reproduce_outputs_and_tree(tmp_path):
    model = small_model(prior="student-t", components_per_leaf=2, normalisation="batch", reseed_epochs=[1],
                        final_refit=2)
    model.build()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = RNG.poisson(2.0, size=(40, 7)).astype("float32")
    model.fit(x, batch_size=8, epochs=2, verbose=0)   # epoch 2 starts with a re-seeding; a refit ends it
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded) is TreeVAE and loaded.get_config() == model.get_config()
    assert loaded.parents == SMALL_PARENTS
    before, after = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    assert set(before) == {"latent", "level_1_probabilities", "level_2_probabilities", "level_3_probabilities",
                           "component", "elbo_per_count", "counts"}
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_gradients_reach_every_weight():
    model = small_model(prior="student-t", components_per_leaf=2, normalisation="batch")
    model.build()
    x = tf.constant(RNG.poisson(2.0, size=(8, 7)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model.terms(x, training=True)["loss"])
    grads = tape.gradient(loss, model.trainable_variables)
    names = [v.path for v in model.trainable_variables]
    assert sum("offsets" in n for n in names) == 4 and any("raw_df" in n for n in names)
    for path, grad in zip(names, grads):
        assert grad is not None and np.any(tf.convert_to_tensor(grad).numpy() != 0), f"no gradient reaches {path}"


def test_match_to_tree_finds_the_tree_of_permuted_clusters():
    """Leaves placed so that siblings are close; clusters given in a shuffled order must come back
    to leaves whose classes at every level are the true ones (up to swapping identical subtrees)."""
    rng = np.random.default_rng(4)
    ancestors = leaf_ancestors(PBMC_PARENTS, 9)
    centres = sum(s * rng.normal(size=(k, 6))[row] for s, k, row in zip((8, 4, 2, 1), (2, 4, 5, 9), ancestors))
    counts = rng.integers(50, 200, size=9).astype(float)
    for exhaustive in (True, False):
        order = rng.permutation(9)
        if exhaustive:
            leaf = match_to_tree(centres[order], counts[order], PBMC_PARENTS)
        else:  # the pairwise-swap search used beyond ten leaves
            from scvae_hier import tree_clustering as tree
            limit, tree.EXHAUSTIVE_LEAVES = tree.EXHAUSTIVE_LEAVES, 3
            try:
                leaf = match_to_tree(centres[order], counts[order], PBMC_PARENTS)
            finally:
                tree.EXHAUSTIVE_LEAVES = limit
        found = ancestors[:, leaf]                       # class of each shuffled cluster at every level
        truth = ancestors[:, order]
        for level in range(3):
            assert adjusted_rand_score(truth[level], found[level]) == 1.0, (exhaustive, level)


def test_assign_to_tree_rejoins_a_type_split_in_two():
    """Nine PBMC-shaped leaves, the stem leaf seen as two clusters and two CD4 leaves as one: the
    eighteen-to-nine assignment puts both stem clusters under Stem and keeps every class compact."""
    rng = np.random.default_rng(5)
    ancestors = leaf_ancestors(PBMC_PARENTS, 9)
    leaf_centres = sum(s * rng.normal(size=(k, 6))[row] for s, k, row in zip((8, 4, 2, 1), (2, 4, 5, 9), ancestors))
    source = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8])   # two clusters per leaf
    centres = leaf_centres[source] + 0.3 * rng.normal(size=(18, 6))
    leaf = assign_to_tree(centres, np.full(18, 100.0), PBMC_PARENTS, 9)
    for level in range(3):
        assert adjusted_rand_score(ancestors[level][source], ancestors[level][leaf]) == 1.0, level


def test_tree_clustering_gives_components_in_the_trees_shape():
    ancestors = leaf_ancestors(SMALL_PARENTS, 5)
    # Level-1 classes apart on axis 0, level-2 classes within them on axis 1, leaves on axis 2.
    centres = np.stack([10.0 * ancestors[0], 5.0 * ancestors[1], 2.5 * ancestors[2]], axis=1)
    truth = np.repeat(np.arange(5), 80)
    latent = centres[truth] + 0.2 * np.random.default_rng(3).normal(size=(400, 3))
    component = tree_clustering(latent, SMALL_PARENTS, 5, per_leaf=2)
    assert component.max() == 9
    for level in range(3):
        assert adjusted_rand_score(ancestors[level][truth], ancestors[level][component // 2]) == 1.0


TWO_BY_TWO = [[0, 0, 1, 1]]   # two classes of two leaves each


def two_lines(n_per_leaf=100, gap=3.0, seed=0):
    """Two parallel lines of cells (spacing 0.05, `gap` apart), each cut into two leaves: the true
    classes are the lines, but the leaves at the same end of both lines are closer to each other
    than to the other half of their own line (the naive CD4 / naive CD8 T situation)."""
    rng = np.random.default_rng(seed)
    along = np.tile(np.linspace(0.0, 10.0, 2 * n_per_leaf), 2)
    line = np.repeat([0, 1], 2 * n_per_leaf)
    latent = np.stack([along, gap * line], axis=1) + 0.01 * rng.normal(size=(4 * n_per_leaf, 2))
    half = (along >= 5.0).astype(int)
    return latent, np.array([[0, 2], [1, 3]])[line, half], line   # leaves 0, 1 on line 0, mixed order


def test_leaf_links_and_graph_scores_match_a_cell_level_count():
    """Links between leaves and each assignment's normalised association, against brute force on the
    cells: the k nearest neighbours from the full distance matrix, the graph symmetrised, every
    class's inside and outgoing links summed cell by cell."""
    rng = np.random.default_rng(7)
    latent, leaf = rng.normal(size=(120, 3)), rng.integers(0, 9, 120)
    links = leaf_links(latent, leaf, 9, neighbours=5)
    distance = ((latent[:, None] - latent[None]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)
    adjacency = np.zeros((120, 120))
    adjacency[np.repeat(np.arange(120), 5), np.argsort(distance, axis=1)[:, :5].ravel()] = 1.0
    adjacency = adjacency + adjacency.T
    ancestors = leaf_ancestors(PBMC_PARENTS, 9)
    assignments = np.array([rng.permutation(9) for _ in range(4)])
    scores = _graph_scores(links, ancestors, assignments)
    for assignment, score in zip(assignments, scores):
        expected = 0.0
        for level in (1, 2):                               # below the top level, above the leaves
            cls = ancestors[level][assignment[leaf]]
            for k in range(ancestors[level].max() + 1):
                inside = adjacency[np.ix_(cls == k, cls == k)].sum()
                expected += 0.5 ** level * inside / adjacency[cls == k].sum() / (ancestors[level].max() + 1)
        assert score == pytest.approx(expected, rel=1e-9)


# Lymphoid (two lines of T-like cells and a B-like blob) against far myeloid blobs: 2/4/7.
LINEAGE_PARENTS = [[0, 0, 0, 1], [0, 0, 1, 1, 2, 3, 3]]


def lineages(n_per_leaf=100, seed=0):
    """`two_lines` (leaves 0-3; classes 0 and 1 are the lines) plus a B-like blob near them (leaf 4)
    and two myeloid blobs far away (leaves 5, 6): no link joins the blobs to anything, so only
    distances say that the B blob is lymphoid."""
    rng = np.random.default_rng(seed)
    lines, leaf, _ = two_lines(n_per_leaf, seed=seed)
    leaf = np.array([0, 2, 1, 3])[leaf]                   # leaves 0, 1 on line 0 and 2, 3 on line 1
    blobs = np.repeat(np.array([[5.0, 8.0], [5.0, 60.0], [9.0, 60.0]]), n_per_leaf, axis=0)
    latent = np.concatenate([lines, blobs + 0.2 * rng.normal(size=blobs.shape)])
    return latent, np.concatenate([leaf, np.repeat([4, 5, 6], n_per_leaf)])


def test_place_leaves_top_level_by_distance_and_lineages_by_links():
    latent, truth = lineages()
    ancestors = leaf_ancestors(LINEAGE_PARENTS, 7)
    counts = np.bincount(truth).astype(float)
    centres = np.array([latent[truth == k].mean(0) for k in range(7)])
    compact = match_to_tree(centres, counts, LINEAGE_PARENTS)[truth]
    assert adjusted_rand_score(ancestors[1][truth], ancestors[1][compact]) < 0.9   # the lines' ends grouped
    for seed in range(4):                                  # whatever order the leaves come in
        shuffled = np.random.default_rng(seed).permutation(7)[truth]
        placed = place_leaves(latent, shuffled, LINEAGE_PARENTS, 7)
        assert adjusted_rand_score(truth, placed) == 1.0                            # the leaves kept
        for level in range(2):
            assert adjusted_rand_score(ancestors[level][truth], ancestors[level][placed]) == 1.0, (seed, level)
    graph = tree_clustering(latent, LINEAGE_PARENTS, 7, clusters_per_leaf=1, placement="graph")
    assert adjusted_rand_score(ancestors[1][truth], ancestors[1][graph]) == 1.0
    with pytest.raises(ValueError, match="leaf placement 'nearest'"):
        tree_clustering(latent, LINEAGE_PARENTS, 7, placement="nearest")


def distinct_types(parents, n_per_leaf=60, seed=0):
    """A hierarchy of distinct types: leaf centres summed from class offsets that shrink by half per
    level, cells tight around them, so no neighbour link joins two leaves and only distances say
    which leaves belong together."""
    rng = np.random.default_rng(seed)
    n_leaves = len(parents[-1])
    ancestors = leaf_ancestors(parents, n_leaves)
    centres = sum(rng.normal(size=(row.max() + 1, 6))[row] * 8.0 / 2 ** level for level, row in enumerate(ancestors))
    truth = np.repeat(np.arange(n_leaves), n_per_leaf)
    return centres[truth] + 0.3 * rng.normal(size=(len(truth), 6)), truth, ancestors


@pytest.mark.parametrize("search", ["exhaustive", "swaps"])
def test_place_leaves_groups_distinct_types_by_distance_where_no_link_tells(search, monkeypatch):
    """Where the graph keeps every link inside every grouping (it cannot tell them apart), the classes'
    spread decides below the top level (`SPREAD_AFTER_GRAPH`): every level right, whatever order the
    leaves come in, for both top levels and for the pairwise-swap search used beyond ten leaves."""
    parents = [[0, 0, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3]]
    latent, truth, ancestors = distinct_types(parents)
    links = clustering.leaf_links(latent, truth, 8)
    assert links[~np.eye(8, dtype=bool)].sum() == 0                  # no link between two leaves
    if search == "swaps":
        monkeypatch.setattr(clustering, "EXHAUSTIVE_LEAVES", 3)
    for seed in range(3):
        shuffled = np.random.default_rng(seed).permutation(8)[truth]
        for top in ("compact", "linkage"):
            placed = place_leaves(latent, shuffled, parents, 8, top_level=top)
            for level, row in enumerate(ancestors):
                assert adjusted_rand_score(row[truth], row[placed]) == 1.0, (seed, top, level)
    margin, other = nearest_other_grouping(latent, truth, parents, 8, top_level="linkage")
    assert 0 < margin < 1e-5                                          # the spread term alone
    line = describe_margin({"margin": margin, "regrouped": regrouped_leaves(parents, 8, other)})
    assert "no link tells the two apart, so the classes' spread" in line


def test_labelled_clustering_keeps_labels_over_the_graph():
    """With labels the leaves are anchored by them; the graph does not move them."""
    latent, leaf, line = two_lines()
    allowed = np.ones((len(leaf), 4), bool)
    allowed[::10] = np.eye(4, dtype=bool)[leaf[::10]]       # every tenth cell labelled with its leaf
    found = tree_clustering(latent, TWO_BY_TWO, 4, clusters_per_leaf=1, allowed=allowed, placement="graph")
    assert (found[::10] == leaf[::10]).all()


def test_label_conflicts_count_the_labelled_cells_each_slot_would_exclude():
    """Against a loop over cells; novel slots never trade leaves with named ones."""
    rng = np.random.default_rng(3)
    leaf, allowed = rng.integers(0, 5, 60), rng.random((60, 5)) < 0.6
    allowed[::3] = True                                                    # unlabelled cells allow every leaf
    expected = np.zeros((5, 5))
    for cell in range(60):
        expected[leaf[cell]] += ~allowed[cell]
    np.testing.assert_array_equal(label_conflicts(leaf, allowed, 5), expected)
    with_novel = label_conflicts(leaf, allowed, 5, novel=1)
    assert (with_novel[:4, 4] > 60).all() and (with_novel[4, :4] > 60).all()
    np.testing.assert_array_equal(with_novel[:4, :4], expected[:4, :4])


def test_top_level_labels_leave_the_levels_below_to_the_graph():
    """Labels at the top level only: the leaves under each labelled class are placed by the graph,
    as without labels (compactness groups the lines' ends), and no labelled cell leaves its class;
    a marker then re-places leaves inside the labels' bounds."""
    latent, truth = lineages()
    ancestors = leaf_ancestors(LINEAGE_PARENTS, 7)
    allowed = np.ones((len(truth), 7), bool)
    labelled = np.arange(len(truth)) % 10 == 0
    allowed[labelled] = ancestors[0][None, :] == ancestors[0][truth[labelled]][:, None]
    found = {placement: tree_clustering(latent, LINEAGE_PARENTS, 7, clusters_per_leaf=1, allowed=allowed,
                                        placement=placement) for placement in ("compact", "graph")}
    assert adjusted_rand_score(ancestors[1][truth], ancestors[1][found["compact"]]) < 0.9
    for level in range(2):
        assert adjusted_rand_score(ancestors[level][truth], ancestors[level][found["graph"]]) == 1.0, level
    assert allowed[np.arange(len(truth)), found["graph"]].all()
    # a marker of the B-like blob's level-2 slot (class 2) highest on leaf 2 (a line's end): the slot
    # takes that leaf, inside the lymphoid class the labels give it
    marked = tree_clustering(latent, LINEAGE_PARENTS, 7, clusters_per_leaf=1, allowed=allowed, placement="graph",
                             markers=((truth == 2).astype(float)[:, None], [(1, 2)]))
    assert allowed[np.arange(len(truth)), marked].all()
    assert np.bincount(truth[ancestors[1][marked] == 2]).argmax() == 2
    # a marker of the myeloid class highest on line 1: without labels it moves line 1 there, with
    # them nothing crosses the top level
    myeloid = (np.isin(truth, [2, 3]).astype(float)[:, None], [(0, 1)])
    free = tree_clustering(latent, LINEAGE_PARENTS, 7, clusters_per_leaf=1, placement="graph", markers=myeloid)
    assert adjusted_rand_score(ancestors[0][truth], ancestors[0][free]) < 0.5
    held = tree_clustering(latent, LINEAGE_PARENTS, 7, clusters_per_leaf=1, allowed=allowed, placement="graph",
                           markers=myeloid)
    assert adjusted_rand_score(ancestors[0][truth], ancestors[0][held]) == 1.0


def test_weighted_tree_scores_match_a_cell_level_sum_of_squares():
    """The grouping score with level weights is minus the weighted within-class sum of squares of
    the cells (plus a constant), computed here cell by cell for random assignments."""
    rng = np.random.default_rng(7)
    parents = [[0, 0, 1], [0, 1, 1, 2, 2]]                       # 2 / 3 / 5 leaves
    ancestors = leaf_ancestors(parents, 5)
    cells = rng.normal(size=(300, 3)) + 3 * rng.integers(0, 4, size=(300, 1))
    cluster = rng.integers(0, 8, size=300)                       # eight clusters, some leaves get two
    centres = np.array([cells[cluster == k].mean(0) for k in range(8)])
    counts = np.bincount(cluster, minlength=8).astype(float)
    weights = coarse_first_weights(3, 0.5)
    assert np.allclose(weights, [1, 0.5, 0.25])
    assignments = np.array([rng.permutation(np.r_[np.arange(5), rng.integers(0, 5, 3)]) for _ in range(6)])
    within = []
    for assignment in assignments:
        total = 0.0
        for weight, row in zip(weights, ancestors):
            node = row[assignment][cluster]
            total += weight * sum(((cells[node == j] - cells[node == j].mean(0)) ** 2).sum() for j in np.unique(node))
        within.append(total)
    scores = _tree_scores(centres, counts, ancestors, assignments, weights)
    # score + weighted within-class SS = weighted sum over levels of n |grand mean|^2 ... a constant
    assert np.allclose(scores + np.array(within), scores[0] + within[0])
    assert not np.allclose(scores, scores[0])


# A Kang-shaped tree: Lymphoid (B; T/NK: CD4, CD8, NK) and Myeloid (phagocytes: CD14, FCGR3A, DC;
# megakaryocytes), eight leaves. Its clusters: CD4 T cells in three spread pieces, CD8 T + NK in
# one, B cells apart from both lineages, and myeloid pieces (CD14 in two) but none for the
# megakaryocytes' leaf.
KANG_PARENTS = [[0, 0, 1, 1], [0, 1, 1, 1, 2, 2, 2, 3]]
KANG_PIECES = np.array([[-3, 0], [0, 3], [0, -3], [2.5, 0], [5, 6], [12, 1], [12, -1], [14, 0], [12, 3]], float)
KANG_COUNTS = np.array([1500, 1500, 1500, 1800, 1300, 1350, 1350, 700, 200], float)
KANG_LINEAGE = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])


def test_coarse_levels_first_keep_the_lineages_when_a_big_type_is_split():
    """Every level alike, splitting the CD4 pieces over three leaves gains more at the leaf level
    than it costs to put the B cells under the myeloid node (Kang, NOTES.md); with the coarse
    levels weighted first (decay 0.5) every piece stays in its lineage, and the megakaryocytes'
    leaf gets a myeloid piece. Several searches and jittered pieces, so it is not one tie."""
    top = leaf_ancestors(KANG_PARENTS, 8)[0]
    lineage = {"alike": [], "decay 0.5": [], "top level first": []}
    for seed in range(4):
        pieces = KANG_PIECES + 0.1 * np.random.default_rng(seed).normal(size=KANG_PIECES.shape)
        groupings = {"alike": assign_to_tree(pieces, KANG_COUNTS, KANG_PARENTS, 8, seed=seed),
                     "decay 0.5": assign_to_tree(pieces, KANG_COUNTS, KANG_PARENTS, 8, seed=seed,
                                                 level_weights=coarse_first_weights(3, 0.5)),
                     # the top level fixed first at decay 0.5, the levels below alike
                     "top level first": coarse_first_grouping(pieces, KANG_COUNTS, KANG_PARENTS, 8, seed=seed,
                                                              top_level_decay=0.5)}
        for rule, leaf in groupings.items():
            lineage[rule].append(adjusted_rand_score(KANG_LINEAGE, top[leaf]))
    assert min(lineage["alike"]) < 1.0      # the failure the weights are for
    assert lineage["decay 0.5"] == lineage["top level first"] == [1.0] * 4


def test_top_level_fixed_first_then_the_levels_below_grouped_inside_it():
    """coarse_first_grouping against brute force over all 8! matchings of eight Kang-shaped pieces
    to the eight leaves: its top-level classes are those of the best matching with decay 0.5, and
    below them it is the best matching with every level alike among those that keep those classes.
    (Where the first step changes the lineages is the nine-piece test above.)"""
    pieces, counts = KANG_PIECES[:8], KANG_COUNTS[:8]              # one piece per leaf: no megakaryocytes
    ancestors = leaf_ancestors(KANG_PARENTS, 8)
    permutations = np.array(list(itertools.permutations(range(8))))

    def within(weights):                                         # [A] weighted within-class SS, piece by piece
        total = np.zeros(len(permutations))
        for weight, row in zip(weights, ancestors):
            node = row[permutations]                             # [A, K]: each piece's class
            for j in np.unique(row):
                mass = (node == j) * counts                      # [A, K]
                size = np.maximum(mass.sum(1, keepdims=True), 1e-12)
                mean = mass @ pieces / size                      # [A, D]
                total += weight * (mass * ((pieces[None] - mean[:, None]) ** 2).sum(-1)).sum(1)
        return total

    top_first = permutations[within([1, 0.5, 0.25]).argmin()]
    same_top = (ancestors[0][permutations] == ancestors[0][top_first]).all(1)
    alike = within([1, 1, 1])
    best_below = alike[same_top].min()
    leaf = coarse_first_grouping(pieces, counts, KANG_PARENTS, 8, grouping_decay=1.0, top_level_decay=0.5)
    chosen = (permutations == leaf).all(1)
    assert (ancestors[0][leaf] == ancestors[0][top_first]).all()
    assert np.isclose(alike[chosen][0], best_below)
    # with no first step it is the plain coarse-first matching
    plain = coarse_first_grouping(pieces, counts, KANG_PARENTS, 8, grouping_decay=0.5)
    assert (permutations[within([1, 0.5, 0.25]).argmin()] == plain).all()


def test_labels_hold_in_both_steps_of_the_coarse_first_grouping():
    """Kang-shaped pieces, a CD14 piece labelled Myeloid and a dendritic piece (700 cells) labelled
    B (a lymphoid leaf): the top-level step must honour the labels too, or the second step would
    keep the dendritic piece under Myeloid (700 cells outside their fixed top class outweigh three
    labelled cells). With both labels it goes to the B leaf (and the CD14 piece stays myeloid);
    with the Myeloid label alone every piece stays in its lineage."""
    top = leaf_ancestors(KANG_PARENTS, 8)[0]
    myeloid = np.zeros((9, 8))
    myeloid[5, top == 0] = 2.0                                    # piece 5 (CD14): two cells labelled Myeloid
    both = myeloid.copy()
    both[7, 1:] = 3.0                                             # piece 7 (DC): three cells labelled B (leaf 0)
    for seed in range(3):
        kwargs = dict(seed=seed, grouping_decay=0.85, top_level_decay=0.5)
        plain = coarse_first_grouping(KANG_PIECES, KANG_COUNTS, KANG_PARENTS, 8, labels_penalty=myeloid, **kwargs)
        labelled = coarse_first_grouping(KANG_PIECES, KANG_COUNTS, KANG_PARENTS, 8, labels_penalty=both, **kwargs)
        assert (top[plain] == KANG_LINEAGE).all()
        assert labelled[7] == 0 and top[labelled[5]] == 1


@pytest.mark.parametrize("tolerance, kept", [(1.3, True), (1.1, False)])
def test_coarse_first_grouping_is_kept_only_if_its_leaves_stay_compact(monkeypatch, tolerance, kept):
    """tree_clustering groups the clusters twice, levels alike and coarse levels first, and keeps
    the second only if its within-leaf sum of squares (computed here cell by cell) is at most
    LEAF_TOLERANCE times the first's; with labels too, their penalty reaching both groupings. The
    coarse-first grouping is stood in for by one that merges two overlapping blobs, which costs
    about a fifth more within-leaf sum of squares."""
    from scvae_hier import tree_clustering as tree
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [0, 1], [20, 0], [20, 20], [40, 0]], float)
    latent = np.concatenate([c + rng.normal(scale=0.5, size=(40, 2)) for c in centres])
    blob = np.repeat(np.arange(5), 40)
    merged = np.where(blob == 1, 0, blob)
    calls, penalties = [], []

    class Blobs:  # k-means stand-in: the blobs themselves
        def __init__(self, *args, **kwargs):
            self.labels_, self.cluster_centers_ = blob, np.array([latent[blob == k].mean(0) for k in range(5)])

        def fit(self, points):
            return self

    def grouping(centres_, counts, parents, n_leaves, seed=0, penalty=None, level_weights=None):
        calls.append(level_weights)
        penalties.append(penalty)
        return np.arange(5) if level_weights is None else np.array([0, 0, 2, 3, 4])

    monkeypatch.setattr(tree, "KMeans", Blobs)
    monkeypatch.setattr(tree, "assign_to_tree", grouping)
    monkeypatch.setattr(tree, "LEAF_TOLERANCE", tolerance)
    within = {name: sum(((latent[leaf == k] - latent[leaf == k].mean(0)) ** 2).sum() for k in np.unique(leaf))
              for name, leaf in dict(alike=blob, merged=merged).items()}
    assert 1.1 < within["merged"] / within["alike"] < 1.3       # the two tolerances fall on either side
    leaf = tree_clustering(latent, SMALL_PARENTS, 5, clusters_per_leaf=1, grouping_decay=0.5)
    assert calls[0] is None and np.allclose(calls[1], [1, 0.5, 0.25])
    assert (leaf == (merged if kept else blob)).all()
    calls.clear()
    penalties.clear()
    allowed = np.ones((200, 5), bool)
    allowed[0, 1:] = False                                       # one cell of blob 0 labelled for leaf 0
    leaf = tree_clustering(latent, SMALL_PARENTS, 5, clusters_per_leaf=1, grouping_decay=0.5, allowed=allowed)
    assert calls[0] is None and np.allclose(calls[1], [1, 0.5, 0.25])
    assert all(p is not None and p[0, 1:].sum() == 4 and p[1:].sum() == 0 for p in penalties)
    assert (leaf == (merged if kept else blob)).all()
    with pytest.raises(ValueError, match="grouping_decay must be in"):
        small_model(grouping_decay=0)
    with pytest.raises(ValueError, match="top_level_decay must be in"):
        small_model(top_level_decay=1.5)


def test_prune_leaves_keeps_every_kept_pair_of_leaves_together_or_apart_as_before():
    """Checked pair by pair against the original tree: two kept leaves share a class at a level in
    the pruned tree exactly when they did before, and classes keep their order."""
    for empty in ([0], [5, 6], [1, 7, 8]):
        pruned, kept = prune_leaves(PBMC_PARENTS, 9, empty)
        assert kept.tolist() == [k for k in range(9) if k not in empty]
        before, after = leaf_ancestors(PBMC_PARENTS, 9)[:, kept], leaf_ancestors(pruned, len(kept))
        for level in range(4):
            same_before = before[level][:, None] == before[level][None]
            assert (same_before == (after[level][:, None] == after[level][None])).all()
            assert (np.diff(after[level][np.argsort(before[level], kind="stable")]) >= 0).all()
    pruned, _ = prune_leaves(PBMC_PARENTS, 9, [0])          # CD34 alone under Stem: Stem goes too
    assert [len(links) for links in pruned] == [3, 4, 8] and max(pruned[0]) == 0


def absent_lone_leaf(n_per_type=120, seed=0):
    """SMALL_PARENTS data without leaf 0's type (the one-leaf level-2 class under level-1 class 0):
    four well-apart types for leaves 1-4, the two of each level-1 class close together."""
    ancestors = leaf_ancestors(SMALL_PARENTS, 5)
    centres = np.stack([12.0 * ancestors[0], 4.0 * ancestors[1], 2.0 * ancestors[2]], axis=1)
    truth = np.repeat(np.arange(1, 5), n_per_type)
    return centres[truth] + 0.15 * np.random.default_rng(seed).normal(size=(len(truth), 3)), truth, ancestors


def test_an_empty_leaf_gets_no_cells_and_the_others_stay_whole():
    """With every leaf filled, one of the four types is split to fill leaf 0's slot, and that piece
    lands in the wrong level-2 class; with leaf 0 left empty every type is one leaf, in its class."""
    latent, truth, ancestors = absent_lone_leaf()
    filled = tree_clustering(latent, SMALL_PARENTS, 5, clusters_per_leaf=2)
    assert (filled == 0).any() and adjusted_rand_score(ancestors[1][truth], ancestors[1][filled]) < 0.99
    leaf = tree_clustering(latent, SMALL_PARENTS, 5, clusters_per_leaf=2, empty_leaves=[0])
    assert not (leaf == 0).any()
    for level in range(3):
        assert adjusted_rand_score(ancestors[level][truth], ancestors[level][leaf]) == 1.0


def test_final_refit_leaves_the_empty_leaf_without_weight_or_cells():
    latent, truth, _ = absent_lone_leaf(seed=1)
    loc, scale = latent[:, :2].astype("float32"), np.full((len(latent), 2), 0.2, "float32")
    model = small_model(components_per_leaf=2, empty_leaves=[0])
    model.build()
    component = model.refit_prior(loc, scale, steps=3)
    assert not (component // 2 == 0).any()
    weights = np.exp(model.log_pc().numpy())
    assert weights[:2].max() < 1e-9 and abs(weights.sum() - 1) < 1e-5
    assert TreeVAE.from_config(model.get_config()).empty_leaves == [0]
    epoch_reseed = model.reseed(loc, scale)                    # the re-seeds during training fill every leaf
    assert (epoch_reseed // 2 == 0).any()
    model.refit_prior(loc, scale, steps=2, reseed=False)       # EM alone empties it again: the model's property
    assert np.exp(model.log_pc().numpy())[:2].max() < 1e-9
    for bad, message in ((dict(empty_leaves=[5]), "leaf indices in 0..4"),
                         (dict(empty_leaves=[0, 1, 2, 3]), "at least 2 leaves"),
                         (dict(empty_leaves=[0], prior_probabilities="uniform"), "prior_probabilities='learnable'")):
        with pytest.raises(ValueError, match=message):
            small_model(**bad)
    # with labels: top-level labels leave the leaf empty and hold; a label only the empty leaf allows is refused
    labelled = small_model(components_per_leaf=2, empty_leaves=[0], semi_supervised=True)
    labelled.build()
    codes = np.full((len(loc), 3), -1)
    codes[::10, 0] = leaf_ancestors(SMALL_PARENTS, 5)[0][truth[::10]]
    component = labelled.refit_prior(loc, scale, steps=3, labels=codes)
    assert not (component // 2 == 0).any()
    assert labelled.allowed(codes)[np.arange(len(loc)), component].all()
    codes[0] = [0, 0, -1]                                      # level-2 class 0 holds only the empty leaf
    with pytest.raises(ValueError, match="allowed only empty leaves"):
        labelled.refit_prior(loc, scale, steps=3, labels=codes)


def test_arguments_from_hierarchy_and_bad_trees():
    hierarchy = Hierarchy("label", ["a", "b"], {"x": ("A", "A1"), "y": ("A", "A2"), "z": ("B", "B1")})
    options = SimpleNamespace(model="tree", level_sizes=None, prior="normal", marginal_usage=1.0,
                              usage_target="uniform", usage_level_weights=None, components_per_leaf=2,
                              prior_probabilities="uniform", reseed_epochs=(3,), reseed_clusters=2, final_refit=10,
                              final_refit_clusters=None)
    arguments = TreeVAE.arguments_from(options, hierarchy)
    assert arguments["parents"] == [[0, 0, 1]] and arguments["level_sizes"] == [2, 3]
    with_empty = SimpleNamespace(**vars(options), empty_leaves=["B1"])
    assert TreeVAE.arguments_from(with_empty, hierarchy)["empty_leaves"] == [2]
    with_empty.empty_leaves = ["C1"]
    with pytest.raises(ValueError, match=r"names \['C1'\], not leaves .*; its leaves are \['A1', 'A2', 'B1'\]"):
        TreeVAE.arguments_from(with_empty, hierarchy)
    assert model_class("tree") is TreeVAE
    with pytest.raises(ValueError, match="needs a hierarchy.*--model mixture --n-components K"):   # and what works without
        TreeVAE.arguments_from(options, None)
    with pytest.raises(ValueError, match="no child"):
        TreeVAE(5, level_sizes=(3, 4), parents=[[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="a parent in 0..1"):
        TreeVAE(5, level_sizes=(2, 3), parents=[[0, 2, 1]])


def test_refit_em_steps_raise_the_prior_terms_of_the_elbo():
    """With q(z|x) fixed, each EM step on the prior cannot lower sum_x log sum_c p(c) exp(-KL_c(x))."""
    model = small_model(prior_probabilities="learnable", components_per_leaf=2)
    model.build()
    rng = np.random.default_rng(6)
    loc = (rng.normal(size=(300, 2)) + 4 * rng.integers(0, 3, size=(300, 1))).astype("float32")
    scale = rng.uniform(0.2, 1.0, size=(300, 2)).astype("float32")

    def prior_terms():
        kl = model.kl_to_prior(loc[:, None], scale[:, None], loc[:, None], model.components.distribution()).numpy()
        return logsumexp(model.log_pc().numpy() - kl, axis=1).sum()

    model.reseed(loc, scale)
    values = [prior_terms()]
    for _ in range(5):
        model.refit_prior(loc, scale, steps=1, reseed=False)
        values.append(prior_terms())
    assert all(b >= a - 1e-2 for a, b in zip(values, values[1:])), values
    assert values[-1] > values[0]


def test_final_refit_reseeds_with_its_own_cluster_count(monkeypatch):
    """Re-seeding during training uses reseed_clusters per leaf, the final refit final_refit_clusters
    (and its own grouping decays and top-level split)."""
    import scvae_hier.models.tree as tree_module

    asked = []
    original = tree_module.tree_clustering
    monkeypatch.setattr(tree_module, "tree_clustering", lambda *args, **kwargs: (
        asked.append((args[5], kwargs["grouping_decay"], kwargs["top_level_decay"], kwargs["top_level"])),
        original(*args, **kwargs))[1])
    model = small_model(reseed_clusters=2, final_refit_clusters=3, grouping_decay=0.7, top_level_decay=0.4)
    model.build()
    rng = np.random.default_rng(2)
    loc = (rng.normal(size=(300, 2)) + 4 * rng.integers(0, 3, size=(300, 1))).astype("float32")
    scale = np.full_like(loc, 0.5)
    model.reseed(loc, scale)
    model.refit_prior(loc, scale, steps=1)
    # coarse levels first, and the top level by linkage (the default), at the final refit only
    assert asked == [(2, 1.0, 1.0, "compact"), (3, 0.7, 0.4, "linkage")]
    config = TreeVAE.from_config(model.get_config())
    assert config.final_refit_clusters == 3 and config.grouping_decay == 0.7 and config.top_level_decay == 0.4
    compact = small_model(top_level_split="compact")
    compact.build()
    compact.refit_prior(loc, scale, steps=1)
    assert asked[-1][-1] == "compact"


def test_reseeding_callback_sets_components_at_the_given_epoch():
    x, top, leaf = nested_counts(n_per_leaf=40)
    model = TreeVAE(x.shape[1], level_sizes=(2, 4), parents=[[0, 0, 1, 1]], latent_dim=2, hidden=(8,))
    model.build()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    callback = TreeReseeding(x, None, epochs=[1])
    model.fit(x, batch_size=40, epochs=2, verbose=0, callbacks=[callback])
    assert callback.assignments is not None and len(callback.assignments) == len(x)


def tree_counts(n_per_leaf=150, genes=40, seed=0):
    """Counts with a known two-level tree: 2 groups that differ in 20 genes, each with 2 subgroups
    that differ in 10 (test_hierarchical's nested_counts has every leaf 10 genes from a sibling and
    10 from a cousin, so its top split is not identifiable from distances)."""
    rng = np.random.default_rng(seed)
    rows, top, leaf = [], [], []
    for g, s in itertools.product(range(2), range(2)):
        mean = np.full(genes, 1.0)
        mean[0:20] = 8.0 if g == 0 else 0.3
        block = slice(20, 30) if g == 0 else slice(30, 40)
        mean[block] = 8.0 if s == 0 else 0.3
        rows.append(rng.negative_binomial(5, 5 / (5 + mean), size=(n_per_leaf, genes)))
        top += [g] * n_per_leaf
        leaf += [2 * g + s] * n_per_leaf
    return np.vstack(rows).astype("float32"), np.array(top), np.array(leaf)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_both_levels_of_a_known_nested_structure(seed):
    x, top, leaf = tree_counts()
    order = np.random.default_rng(1).permutation(len(x))
    keras.utils.set_random_seed(seed)
    model = TreeVAE(x.shape[1], level_sizes=(2, 4), parents=[[0, 0, 1, 1]], latent_dim=4, hidden=(32, 32),
                    reseed_epochs=[5], final_refit=10, seed=seed)
    model.build()
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(x[order], batch_size=64, epochs=20, verbose=0, callbacks=[KLWarmUp(5)])
    out = model.predict(x, verbose=0)
    predictions = path_predictions([out["level_1_probabilities"], out["level_2_probabilities"]], model.parents)
    assert adjusted_rand_score(top, predictions[0]) > 0.9
    assert adjusted_rand_score(leaf, predictions[1]) > 0.9


def test_one_step_away_lists_every_valid_move_and_swap_once():
    """The local search's neighbourhood against brute force: every assignment that changes one
    cluster's leaf without emptying a leaf, or exchanges the leaves of two clusters on different
    leaves, exactly once; nothing else."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        n_leaves = int(rng.integers(2, 5))
        k = int(rng.integers(n_leaves, n_leaves + 5))        # at most 4^8 assignments to enumerate
        current = np.concatenate([rng.permutation(n_leaves), rng.integers(0, n_leaves, k - n_leaves)])[rng.permutation(k)]
        expected = set()
        for candidate in itertools.product(range(n_leaves), repeat=k):
            candidate = np.array(candidate)
            changed = np.flatnonzero(candidate != current)
            covers = len(set(candidate)) == n_leaves
            if len(changed) == 1 and covers:
                expected.add(tuple(candidate))
            if len(changed) == 2 and candidate[changed[0]] == current[changed[1]] \
                    and candidate[changed[1]] == current[changed[0]]:
                expected.add(tuple(candidate))
        listed = [tuple(row) for row in _one_step_away(current, n_leaves)]
        assert len(listed) == len(set(listed)) and set(listed) == expected


ONE_AND_THREE = [[0, 1, 1, 1]]   # a top class with one leaf (PBMC's Stem) beside one with three


def outgroup(seed=0):
    """Two adjacent blobs (T-like, leaves 0-1), a big distinct blob (NK-like, leaf 2) and a small
    blob farther from every other (stem-like, leaf 3)."""
    rng = np.random.default_rng(seed)
    centres, sizes = np.array([[0.0, 0.0], [1.5, 0.0], [5.0, 0.0], [0.0, 6.0]]), [300, 300, 450, 100]
    latent = np.concatenate([c + 0.3 * rng.normal(size=(n, 2)) for c, n in zip(centres, sizes)])
    return latent, np.repeat(np.arange(4), sizes)


def test_linkage_scores_are_the_mean_distance_between_classes_by_brute_force():
    latent, leaf = outgroup()
    distances, counts = leaf_distances(latent, leaf, 4), np.bincount(leaf)
    assignments = np.array(list(itertools.permutations(range(4))))
    scores = _linkage_scores(distances, counts, leaf_ancestors(ONE_AND_THREE, 4)[0], assignments)
    for a, score in zip(assignments, scores):
        alone = a[leaf] == 0                                # cells whose leaf went to the one-leaf class
        assert score == pytest.approx(cdist(latent[alone], latent[~alone]).mean(), rel=1e-9)


def test_linkage_sets_apart_the_farthest_leaf_where_compactness_sets_apart_the_biggest():
    latent, truth = outgroup()
    top = leaf_ancestors(ONE_AND_THREE, 4)[0]
    for seed in range(3):
        shuffled = np.random.default_rng(seed).permutation(4)[truth]
        compact = place_leaves(latent, shuffled, ONE_AND_THREE, 4)
        linkage = place_leaves(latent, shuffled, ONE_AND_THREE, 4, top_level="linkage")
        assert set(truth[top[compact] == 0]) == {2}       # the big NK-like blob alone
        assert set(truth[top[linkage] == 0]) == {3}       # the far stem-like blob alone
    found = tree_clustering(latent, ONE_AND_THREE, 4, clusters_per_leaf=1, placement="graph", top_level="linkage")
    assert adjusted_rand_score(truth == 3, top[found] == 0) == 1.0
    with pytest.raises(ValueError, match="top-level split 'ward'"):
        tree_clustering(latent, ONE_AND_THREE, 4, placement="graph", top_level="ward")


def test_linkage_sets_no_fragment_apart():
    """A 20-cell blob farther still than the stem-like one (PBMC: ~80 myeloid-like cells of the
    CD34+ sort, 1% of the cells, made a leaf of their own) is not set apart as the top class: the
    stem-like blob is. `_too_small` against a count by hand."""
    latent, truth = outgroup()
    rng = np.random.default_rng(1)
    latent = np.concatenate([latent[truth != 1], [-6.0, -6.0] + 0.3 * rng.normal(size=(20, 2))])
    truth = np.concatenate([truth[truth != 1], np.full(20, 1)])   # leaf 1 is now the far fragment
    top = leaf_ancestors(ONE_AND_THREE, 4)[0]
    counts = np.bincount(truth, minlength=4)
    assignments = np.array(list(itertools.permutations(range(4))))
    for a, small in zip(assignments, _too_small(counts, top, assignments)):
        alone = counts[a == 0].sum()                  # the cells of the leaf in the one-leaf class's slot
        assert small == (alone < 0.25 * counts.sum() / 4 or counts.sum() - alone < 0.25 * counts.sum() * 3 / 4)
    distances = leaf_distances(latent, truth, 4)
    farthest = np.argmax(distances.sum(axis=1) / 3)
    assert farthest == 1                              # without the guard the fragment would be set apart
    for seed in range(3):
        shuffled = np.random.default_rng(seed).permutation(4)[truth]
        placed = place_leaves(latent, shuffled, ONE_AND_THREE, 4, top_level="linkage")
        assert set(truth[top[placed] == 0]) == {3}


ONE_ONE_THREE = [[0, 1, 1], [0, 1, 2, 2, 2]]   # top: A | rest; level 2: A | a one-leaf class | a three-leaf class


def far_blob_beside_nk_like(far_cells):
    """Five blobs, one leaf each: 0 far from the rest (the top class), 1 NK-like (touching 3), 2-3 a
    T-like pair, 4 `far_cells` cells far from everything."""
    rng = np.random.default_rng(0)
    centres, sizes = [[0.0, 12.0], [3.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-12.0, -12.0]], [600, 800, 600, 600, far_cells]
    scales = [0.3, 0.5, 0.3, 0.3, 0.3]
    latent = np.concatenate([np.array(c) + s * rng.normal(size=(n, 2)) for c, n, s in zip(centres, sizes, scales)])
    return latent, np.repeat(np.arange(5), sizes)


@pytest.mark.parametrize("far_cells, alone", [(20, "NK-like"), (60, "far")])
def test_no_fragment_takes_a_class_below_the_top(far_cells, alone):
    """A far blob of `far_cells` and an NK-like blob that touches the T-like pair compete for the
    one-leaf level-2 class. Isolated, the far blob keeps all its links wherever it goes, and the
    NK-like blob keeps more of its own inside the T-like class, so the graph gives the class to the
    far blob. With 20 cells (under MIN_CLASS_SHARE of its even share: 0.05 x 2620 / 5 = 26) it is a
    fragment and the NK-like blob gets the class; with 60 it is a small type and keeps it (Kang's
    megakaryocytes, 0.8%). Fewer than 16 cells would link out of the blob (15 neighbours each).
    `fragment_classes` against a count by hand."""
    latent, blob = far_blob_beside_nk_like(far_cells)
    ancestors = leaf_ancestors(ONE_ONE_THREE, 5)
    counts = np.bincount(blob, minlength=5)
    assignments = np.array(list(itertools.permutations(range(5))))
    found = fragment_classes(counts, ancestors[1:-1], assignments, clustering.MIN_CLASS_SHARE)
    for a, n in zip(assignments, found):
        held = [counts[ancestors[1][a] == j].sum() for j in range(3)]
        even = np.bincount(ancestors[1], minlength=3) / 5 * counts.sum()
        assert n == sum(h < 0.05 * e for h, e in zip(held, even))
    one_leaf = {"NK-like": 1, "far": 4}[alone]
    for seed in range(3):
        shuffled = np.random.default_rng(seed).permutation(5)[blob]
        placed = place_leaves(latent, shuffled, ONE_ONE_THREE, 5, top_level="linkage")
        assert set(blob[ancestors[0][placed] == 0]) == {0}
        assert set(blob[ancestors[1][placed] == 1]) == {one_leaf}


def test_without_the_guard_a_fragment_takes_a_class_below_the_top(monkeypatch):
    """The case above with no guard: the 20-cell far blob gets the one-leaf class (what the guard prevents)."""
    monkeypatch.setattr(clustering, "MIN_CLASS_SHARE", 0.0)
    latent, blob = far_blob_beside_nk_like(20)
    placed = place_leaves(latent, blob, ONE_ONE_THREE, 5, top_level="linkage")
    assert set(blob[leaf_ancestors(ONE_ONE_THREE, 5)[1][placed] == 1]) == {4}


def test_marker_genes_outweigh_the_fragment_guard():
    """A rare type the user knows (marker scores high in the 20-cell far blob only, for the one-leaf
    level-2 class) holds that class although the guard alone would give it to the NK-like blob."""
    latent, blob = far_blob_beside_nk_like(20)
    scores = (blob == 4).astype(float)[:, None] + 0.01 * np.random.default_rng(0).normal(size=(len(blob), 1))
    placed = place_leaves(latent, blob, ONE_ONE_THREE, 5, top_level="linkage", markers=(scores, [(1, 1)]))
    ancestors = leaf_ancestors(ONE_ONE_THREE, 5)
    assert set(blob[ancestors[1][placed] == 1]) == {4}
    assert set(blob[ancestors[0][placed] == 0]) == {0}


def test_labels_hold_over_the_linkage_of_the_top_level():
    """Labels say the big blob is the one-leaf class: the linkage's choice (the far blob) gives way."""
    latent, truth = outgroup()
    top = leaf_ancestors(ONE_AND_THREE, 4)[0]
    allowed = np.ones((len(truth), 4), bool)
    labelled = np.arange(len(truth)) % 10 == 0
    allowed[labelled] = (top[None, :] == 0) == (truth[labelled] == 2)[:, None]
    found = tree_clustering(latent, ONE_AND_THREE, 4, clusters_per_leaf=1, allowed=allowed, placement="graph",
                            top_level="linkage")
    assert allowed[np.arange(len(truth)), found].all()
    assert adjusted_rand_score(truth == 2, top[found] == 0) == 1.0


@pytest.mark.parametrize("chunk", [40320, 24])
def test_permutation_blocks_are_the_first_of_each_set_of_exchanged_slots(chunk):
    """Against brute force: of all 8! permutations, those that are the lexicographic minimum of
    their set (the same but for exchanges of slots within a group), in order, in blocks of at most
    `chunk`; without groups, every permutation in itertools' (lexicographic) order."""
    groups = np.array([0, 1, 2, 2, 2, 2, 3, 3])                 # PBMC's CD4 T and CD8 T leaves

    def first_of_its_set(p):
        p = np.array(p)
        for g in np.unique(groups):
            items = np.flatnonzero(groups[p] == g)                 # the items in group g's slots
            p[items] = np.sort(p[items])
        return tuple(p)
    brute = [p for p in itertools.permutations(range(8)) if first_of_its_set(p) == p]
    blocks = list(permutation_blocks(8, chunk, groups))
    assert max(len(b) for b in blocks) <= chunk
    assert [tuple(p) for b in blocks for p in b] == brute and len(brute) == 40320 // (24 * 2)
    every = np.concatenate(list(permutation_blocks(6, chunk)))
    assert [tuple(p) for p in every] == list(itertools.permutations(range(6)))
    assert [tuple(p) for p in np.concatenate(list(permutation_blocks(6, chunk, np.arange(6))))] == \
        list(itertools.permutations(range(6)))


def test_interchangeable_slots_are_those_every_score_reads_alike():
    ancestors = leaf_ancestors(PBMC_PARENTS, 9)
    np.testing.assert_array_equal(interchangeable_slots(ancestors[:-1]), [0, 1, 2, 3, 3, 3, 3, 4, 4])
    conflicts = np.zeros((9, 9))
    conflicts[2, 4] = 1                                            # a label that excludes one CD4 T slot
    np.testing.assert_array_equal(interchangeable_slots(ancestors[:-1], conflicts), [0, 1, 2, 3, 4, 3, 3, 5, 5])


@pytest.mark.parametrize("seed", range(3))
def test_place_leaves_searches_one_placement_per_set_of_exchanged_slots_and_finds_the_full_searchs(seed,
                                                                                                   monkeypatch):
    """Every grouped search (either top level, with conflicting labels and a marker) returns what
    the search over every permutation returns, bit for bit: the compact top level's scores differ
    in their last bits between exchanged slots, which the rescoring of the near sets settles as
    the full search does. The latent lies far from its origin, where those differences are largest."""
    searched = []
    full_search = clustering._best_permutation

    def both(k, scored, seed=0, chunk=40320, groups=None, tolerance=0.0, costs=None):
        full = full_search(k, scored, seed, chunk)
        np.testing.assert_array_equal(full_search(k, scored, seed, chunk, groups, tolerance, costs), full)
        searched.append(len(np.unique(groups)) < k)
        return full
    monkeypatch.setattr(clustering, "_best_permutation", both)
    rng = np.random.default_rng(seed)
    leaf = rng.integers(0, 7, 400)
    latent = rng.normal(size=(7, 3))[leaf] * 3 + rng.normal(size=(400, 3)) + 40.0
    conflicts = 3.0 * (rng.random((7, 7)) < 0.2)                 # labelled cells a slot would exclude
    # a marked leaf-level class (the first of two sibling slots) tells its slot from its sibling
    marker = (rng.random((400, 1)) + (leaf == rng.integers(0, 7))[:, None], [(2, 0)])
    for top in ("linkage", "compact"):
        place_leaves(latent, leaf, LINEAGE_PARENTS, 7, conflicts=conflicts, markers=marker, top_level=top)
        place_leaves(latent, leaf, LINEAGE_PARENTS, 7, top_level=top)
    assert len(searched) == 6 and all(searched)                   # labels too: their conflicts are costs


def test_grouped_search_rescores_exchanges_that_rounding_tells_apart():
    """Slots 1 and 2 form a group. A score that puts the identity's set on top, the set of a
    non-canonical `target` 0.5e-9 below, and lifts `target` itself 1e-9 (as rounding might): the full
    search returns `target`; so does the grouped one told that exchanges may differ by 2e-9; told
    they cannot, it returns the identity."""
    target, groups = np.array([3, 2, 1, 0, 4]), np.array([0, 1, 1, 2, 3])
    seen_by_groups = lambda a: np.where(np.asarray(a) == 2, 1, a)      # noqa: E731

    def scored(a):
        same = lambda p: (seen_by_groups(a) == seen_by_groups(p)).all(1)  # noqa: E731
        return (np.where(same(np.arange(5)), 0.0, np.where(same(target), -0.5e-9, -1.0))
                + 1e-9 * (np.asarray(a) == target).all(1))
    np.testing.assert_array_equal(_best_permutation(5, scored), target)
    np.testing.assert_array_equal(_best_permutation(5, scored, groups=groups, tolerance=2e-9), target)
    np.testing.assert_array_equal(_best_permutation(5, scored, groups=groups, tolerance=0.0), np.arange(5))


def test_least_exchange_cost_is_the_least_over_every_exchange():
    """Against brute force over `exchanges`: the cheapest placement of each assignment's set, for
    integer costs with many ties (as labelled-cell counts are)."""
    rng = np.random.default_rng(0)
    groups = np.array([0, 1, 1, 2, 2, 2, 2])
    costs = rng.integers(0, 3, (7, 7)).astype(float)
    assignments = np.array([rng.permutation(7) for _ in range(200)])
    maps = exchanges(groups)
    brute = np.array([min(costs[np.arange(7), m[a]].sum() for m in maps) for a in assignments])
    np.testing.assert_array_equal(least_exchange_cost(costs, groups, assignments), brute)
    assert (brute < costs[np.arange(7), assignments].sum(1)).any()    # exchanging is what lowers some


def test_grouped_search_with_costs_returns_the_full_searchs_permutation():
    """Slots that only costs tell apart are grouped; the search returns the full search's
    permutation, first in lexicographic order among ties, for costs sparse (ties) or dense."""
    rng = np.random.default_rng(1)
    groups = np.array([0, 1, 1, 2, 2, 2])
    seen = lambda a: groups[np.asarray(a)]                              # noqa: E731
    weights = rng.normal(size=(6, 3))
    rest = lambda a: np.einsum("akj,kj->a", np.eye(3)[seen(a)], weights).round(1)  # noqa: E731
    for density in (0.1, 0.5, 0.9):
        matrix = 2.0 * (rng.random((6, 6)) < density)
        scored = lambda a: rest(a) - 10.0 * matrix[np.arange(6), np.asarray(a)].sum(1)  # noqa: E731
        np.testing.assert_array_equal(_best_permutation(6, scored, groups=groups, costs=(rest, 10.0, matrix)),
                                      _best_permutation(6, scored))


def test_step_gains_are_the_full_scores_differences():
    """Against `_tree_scores` (and the label penalty) of every candidate one step away, on a
    12-leaf tree with weighted levels and labels, and for one cluster per leaf (swaps only)."""
    rng = np.random.default_rng(3)
    parents = [[0, 0, 1], [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]]
    ancestors = leaf_ancestors(parents, 12)
    weights = [0.5, 0.8, 1.0]
    for k in (30, 12):
        centres, counts = rng.normal(size=(k, 4)) * 3, rng.integers(1, 50, k).astype(float)
        penalty = rng.integers(0, 3, (k, 12)) * 7.5
        current = np.concatenate([np.arange(12), rng.integers(0, 12, k - 12)])[rng.permutation(k)]
        candidates = clustering._one_step_away(current, 12)
        full = lambda a: (_tree_scores(centres, counts, ancestors, a, weights)  # noqa: E731
                          - penalty[np.arange(k), a].sum(-1))
        gains = clustering._step_gains(centres, counts, ancestors, current, candidates, weights, penalty)
        np.testing.assert_allclose(gains, full(candidates) - full(current[None]), rtol=0, atol=1e-8)
        assert np.ptp(gains) > 1.0


def test_assign_to_tree_beyond_ten_leaves_finds_what_full_scores_find(monkeypatch):
    """The step-gain search (beyond EXHAUSTIVE_LEAVES) returns the assignment the full-score search
    returns, with and without labels."""
    rng = np.random.default_rng(4)
    parents = [[0, 0, 0, 1, 1, 1], [i // 2 for i in range(12)]]
    centres, counts = rng.normal(size=(36, 5)) * 4, rng.integers(5, 80, 36).astype(float)
    penalty = (rng.random((36, 12)) < 0.1) * 3.0
    for labels in (None, penalty):
        fast = assign_to_tree(centres, counts, parents, 12, starts=4, penalty=labels, level_weights=[0.5, 0.8, 1.0])
        with monkeypatch.context() as patched:
            patched.setattr(clustering, "EXHAUSTIVE_LEAVES", 12)
            full = assign_to_tree(centres, counts, parents, 12, starts=4, penalty=labels, level_weights=[0.5, 0.8, 1.0])
        np.testing.assert_array_equal(fast, full)


def test_exchanges_are_every_permutation_within_groups():
    maps = exchanges([0, 1, 1, 2, 2, 2])
    assert len(maps) == 2 * 6 and len({tuple(m) for m in maps}) == 12
    for slot_map in maps:
        np.testing.assert_array_equal(slot_map[:1], [0])
        assert sorted(slot_map[1:3]) == [1, 2] and sorted(slot_map[3:]) == [3, 4, 5]


def test_tree_scores_of_permutations_are_bit_for_bit_the_products():
    """The gathered per-leaf sums (one cluster per leaf) give exactly the scores of the one-hot
    product, so no search's choice can move (`test_weighted_tree_scores_match_a_cell_level_sum_of_squares`
    checks the product against the cells)."""
    ancestors = leaf_ancestors(PBMC_PARENTS, 9)
    centres, counts = RNG.normal(size=(9, 4)) * 5, RNG.integers(1, 900, 9).astype(float)
    permutations = np.array([RNG.permutation(9) for _ in range(500)], dtype=np.int16)
    summed = np.column_stack([centres * counts[:, None], counts])
    for levels, weights in ((ancestors, None), (ancestors[:1], None), (ancestors, [1.0, 0.5, 0.25, 0.125])):
        per_leaf = (np.eye(9)[permutations].transpose(0, 2, 1) @ summed).transpose(0, 2, 1)
        expected = np.zeros(len(permutations))
        for level, row in enumerate(levels):
            per_class = per_leaf @ np.eye(row.max() + 1)[row]
            sums, sizes = per_class[:, :-1], per_class[:, -1]
            weight = 1.0 if weights is None else weights[level]
            expected += weight * (np.einsum("adj,adj->aj", sums, sums) / np.maximum(sizes, 1e-12)).sum(-1)
        np.testing.assert_array_equal(_tree_scores(centres, counts, levels, permutations, weights), expected)


def groupings(parents, n_leaves, assignment):
    """Every level's classes above the leaves as a set of sets of leaves (class names forgotten)."""
    return [frozenset(frozenset(np.flatnonzero(row[assignment] == j)) for j in np.unique(row[assignment]))
            for row in leaf_ancestors(parents, n_leaves)[:-1]]


def test_same_grouping_is_equal_sets_of_leaves_at_every_level_by_brute_force():
    permutations = np.array(list(itertools.permutations(range(7))))
    here = np.random.default_rng(3).permutation(7)
    want = [groupings(LINEAGE_PARENTS, 7, a) == groupings(LINEAGE_PARENTS, 7, here) for a in permutations]
    got = same_grouping(leaf_ancestors(LINEAGE_PARENTS, 7), here, permutations)
    np.testing.assert_array_equal(got, want)
    assert 1 < got.sum() < len(got)         # leaves exchanged within a class, and their classes renamed, count as same
    renamed = np.array([2, 3, 0, 1, 4, 5, 6])[here]   # slots 0, 1 (a class) and 2, 3 (its sibling) swapped whole
    assert same_grouping(leaf_ancestors(LINEAGE_PARENTS, 7), here, renamed[None])[0]


@pytest.mark.parametrize("top_level", ["linkage", "compact"])
def test_nearest_other_grouping_is_the_best_different_grouping_by_brute_force(top_level):
    latent, truth = lineages()
    scored = _placement_objective(latent, truth, LINEAGE_PARENTS, 7, top_level=top_level)[0]
    permutations = np.array(list(itertools.permutations(range(7))))
    here = groupings(LINEAGE_PARENTS, 7, np.arange(7))
    other_scores = np.array([s if groupings(LINEAGE_PARENTS, 7, a) != here else -np.inf
                             for a, s in zip(permutations, scored(permutations))])
    margin, other = nearest_other_grouping(latent, truth, LINEAGE_PARENTS, 7, top_level=top_level)
    best_other = other_scores.max()
    assert scored(np.arange(7)[None])[0] - best_other == pytest.approx(margin, rel=1e-9, abs=1e-9)
    assert scored(other[None])[0] == pytest.approx(best_other, rel=1e-12)
    assert groupings(LINEAGE_PARENTS, 7, other) != here
    assert margin > 0      # the true leaves in their slots are the placement's own choice here


def test_the_margin_tells_a_near_tie_from_a_clear_grouping():
    """Four blobs in two rows (the classes of a level below a one-class top). Rows far apart: the rows
    are the classes by a wide margin; blobs on the corners of a square: rows or columns, a near tie."""
    parents = [[0, 0], [0, 0, 1, 1]]
    leaf = np.repeat(np.arange(4), 1000)
    for height, tie in ((6.0, False), (2.5, True)):
        latent = np.array([[0, 0], [2.5, 0], [0, height], [2.5, height]])[leaf]
        latent = latent + np.random.default_rng(0).normal(size=latent.shape)
        margin, other = nearest_other_grouping(latent, leaf, parents, 4, top_level="linkage")
        assert (abs(margin) < NEAR_TIE) == tie and margin > 0, (height, margin)
        moved = regrouped_leaves(parents, 4, other)
        assert list(moved) == [1] and len(moved[1]) == 2          # two blobs trade rows, at level 2
        assert ("near tie" in describe_margin({"margin": margin, "regrouped": moved})) == tie
    assert nearest_other_grouping(latent, leaf, [[0, 0, 0, 0]], 4) is None   # one grouping only


def test_regrouped_leaves_are_the_fewest_that_change_class_under_any_renaming_by_brute_force():
    ancestors = leaf_ancestors(LINEAGE_PARENTS, 7)
    rng = np.random.default_rng(5)
    for other in [np.array([2, 3, 0, 1, 4, 5, 6])] + [rng.permutation(7) for _ in range(30)]:
        moved = regrouped_leaves(LINEAGE_PARENTS, 7, other)
        for level, row in enumerate(ancestors[:-1]):
            fewest = min(sum(renaming[row[k]] != row[other][k] for k in range(7))
                         for renaming in itertools.permutations(range(row.max() + 1)))
            assert len(moved.get(level, [])) == fewest, (other, level)
    assert regrouped_leaves(LINEAGE_PARENTS, 7, np.array([2, 3, 0, 1, 4, 5, 6])) == {}   # sibling classes renamed
    assert regrouped_leaves(LINEAGE_PARENTS, 7, np.array([0, 1, 2, 3, 4, 6, 5])) == {}   # leaves exchanged in a class


def test_the_final_refit_records_how_clearly_its_leaves_are_grouped():
    latent, truth = lineages()
    loc = latent.astype("float32")
    scale = np.full_like(loc, 0.1)
    model = TreeVAE(7, level_sizes=(2, 4, 7), parents=LINEAGE_PARENTS, latent_dim=2, hidden=(6,),
                    normalisation="none", input_transform="log1p", prior_probabilities="learnable")
    model.build()
    component = model.refit_prior(loc, scale, steps=2)
    margin = model.placement_margin(loc, component)
    want, other = nearest_other_grouping(loc, component, LINEAGE_PARENTS, 7, model.seed, top_level="linkage")
    assert margin["margin"] == pytest.approx(want, abs=1e-6)
    assert margin["regrouped"] == {str(k): v for k, v in regrouped_leaves(LINEAGE_PARENTS, 7, other).items()}
    model.markers = [{"level": 1, "class": 0, "genes": ["A"]}]     # marker genes decide: no margin
    assert model.placement_margin(loc, component) is None
    # finest labels on every tenth cell anchor every leaf: any other grouping breaks labels
    labelled = TreeVAE(7, level_sizes=(2, 4, 7), parents=LINEAGE_PARENTS, latent_dim=2, hidden=(6,),
                       normalisation="none", input_transform="log1p", prior_probabilities="learnable",
                       semi_supervised=True)
    labelled.build()
    codes = np.full((len(loc), 3), -1)
    codes[::10] = leaf_ancestors(LINEAGE_PARENTS, 7).T[truth[::10]]
    component = labelled.refit_prior(loc, scale, steps=2, labels=codes)
    margin = labelled.placement_margin(loc, component, codes)
    assert margin["margin"] > 1e8 and describe_margin(margin).endswith("the labels decide the grouping.")
    # leaves the EM steps left breaking 3 labels, where another grouping breaks none: a count, not 3e9
    line = describe_margin({"margin": -3 * MARKERS_FIRST + 0.0006, "regrouped": {"2": [5, 6]}})
    assert "(level 3: leaf 5, leaf 6) puts 3 fewer labelled cells" in line and "e+09" not in line and "000000" not in line
    # beyond the graph terms' range (at most levels - 2): the top split or the fragment rule decides
    line = describe_margin({"margin": -35.1077, "levels": 5, "regrouped": {"2": [5, 6]}})
    assert "35.1077 above" in line and "graph terms" not in line.split(":")[-1] and "the other grouping keeps" in line
    assert "a near tie" in describe_margin({"margin": 0.003, "levels": 5, "regrouped": {"2": [5, 6]}})
    # a big tree's regrouping is listed in short
    line = describe_margin({"margin": 0.5, "regrouped": {"1": list(range(20)), "2": [3, 4]}})
    assert "(level 2: leaf 0, leaf 1, leaf 2, leaf 3, leaf 4, and 15 more; level 3: leaf 3, leaf 4)" in line
