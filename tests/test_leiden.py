"""Leiden bisected to K clusters (the experiment's peers), checked against a brute-force scan of
resolutions; the nesting score against a cell-by-cell count."""
import numpy as np
import pytest
from scipy import sparse

from scvae_hier.analysis.leiden import LeidenCountError, _graph, leiden, leiden_at_k, leiden_levels
from scvae_hier.analysis.peers import leiden_table
from scvae_hier.hierarchy import Hierarchy
from scvae_hier.metrics import nesting


def planted_graph(sizes, p_in=0.6, p_out=0.02, seed=0):
    """A weighted random graph with dense blocks of the given sizes (connected through sparse edges)."""
    rng = np.random.default_rng(seed)
    block = np.repeat(np.arange(len(sizes)), sizes)
    n = block.size
    probability = np.where(block[:, None] == block[None, :], p_in, p_out)
    upper = np.triu(rng.random((n, n)) < probability, k=1)
    weights = upper * rng.uniform(0.5, 1.0, (n, n))
    return sparse.csr_matrix(weights + weights.T), block


def test_bisection_reaches_every_count_a_resolution_scan_finds():
    graph, _ = planted_graph([30, 25, 20, 15, 10])
    g = _graph(graph)
    # Brute force: every cluster count that some resolution on a fine grid gives.
    scanned = {int(leiden(g, r).max()) + 1 for r in np.geomspace(1e-3, 20, 300)}
    wanted = [k for k in sorted(scanned) if k <= 12]
    assert len(wanted) >= 6  # the scan is not trivial: counts 1..5 and beyond
    for k in wanted:
        fit = leiden_at_k(graph, k)
        assert fit.exact and fit.n_clusters == k == np.unique(fit.labels).size
        np.testing.assert_array_equal(leiden(g, fit.resolution), fit.labels)  # the resolution it reports


def test_bisection_says_clearly_when_k_cannot_be_reached():
    graph, block = planted_graph([20, 20, 20], p_out=0.0)  # three disconnected parts: never fewer than 3
    assert leiden_at_k(graph, 3).labels.tolist() == block.tolist() or leiden_at_k(graph, 3).exact
    with pytest.raises(LeidenCountError, match="never 2 .*disconnected.*strict=False"):
        leiden_at_k(graph, 2)
    nearest = leiden_at_k(graph, 2, strict=False)
    assert not nearest.exact and nearest.n_clusters == 3
    with pytest.raises(LeidenCountError, match="61 clusters of 60 cells"):
        leiden_at_k(graph, 61)


def test_nesting_matches_a_cell_by_cell_count():
    rng = np.random.default_rng(1)
    fine = rng.integers(0, 6, 500)
    coarse = np.where(rng.random(500) < 0.8, fine // 2, rng.integers(0, 3, 500))  # 80% under their parent
    majority = {c: np.bincount(coarse[fine == c]).argmax() for c in np.unique(fine)}
    expected = np.mean([coarse[i] == majority[fine[i]] for i in range(500)])
    shares = nesting([coarse, fine])
    assert np.isnan(shares[0]) and shares[1] == pytest.approx(expected) and shares[1] < 1
    # In a given tree (fine class c under c // 2): the share of cells whose coarse cluster is that parent.
    assert nesting([coarse, fine], parents=[np.arange(6) // 2])[1] == pytest.approx(np.mean(coarse == fine // 2))
    assert nesting([fine // 2, fine], parents=[np.arange(6) // 2]) [1] == 1.0


def test_leiden_table_recovers_separated_classes_at_every_level():
    rng = np.random.default_rng(0)
    leaves = np.repeat(["a1", "a2", "b1", "b2"], 40)
    centres = {"a1": (0, 0), "a2": (0, 5), "b1": (30, 0), "b2": (30, 5)}  # leaves touch, so K=2 is reachable
    points = np.array([centres[leaf] for leaf in leaves]) + rng.normal(0, 1, (leaves.size, 2))
    hierarchy = Hierarchy("leaf", ["l1", "l2"], {"a1": ("A", "a1"), "a2": ("A", "a2"),
                                                 "b1": ("B", "b1"), "b2": ("B", "b2")})
    table = leiden_table(hierarchy, leaves, points)
    assert table["ari"].min() > 0.9
    assert table["n_clusters_used"].tolist() == [2, 4] and table.loc["l2", "nesting"] == 1.0
    assert table["hierarchy_consistency"].tolist() == [1.0, 1.0] and (table["n_cells"] == 160).all()
    sample = leiden_table(hierarchy, leaves, points, max_cells=100)   # a seeded sample of the cells
    assert (sample["n_cells"] == 100).all() and sample["ari"].min() > 0.9


def test_leiden_levels_warns_when_a_level_takes_the_nearest_count():
    points = np.concatenate([np.random.default_rng(0).normal(centre, 0.1, (30, 2)) for centre in (0, 50, 100)])
    with pytest.warns(UserWarning, match="could not make 2 clusters at level 1; .* nearest count, 3"):
        fits = leiden_levels(points, [2, 3])
    assert [fit.n_clusters for fit in fits] == [3, 3] and fits[1].exact


def test_neighbour_graph_of_more_than_8192_cells_is_the_exact_knn_graph():
    """From 8,192 cells scanpy's default kNN (pynndescent) returned a csr_array that scanpy 1.11 cannot
    read under scipy 1.17 ('getnnz'); the graph must still build, with each cell's neighbours
    those of an exact search (sklearn, brute force)."""
    from sklearn.neighbors import NearestNeighbors

    from scvae_hier.analysis.leiden import neighbour_graph

    points = np.random.default_rng(0).normal(size=(8300, 5)).astype(np.float32)
    graph = sparse.csr_matrix(neighbour_graph(points, n_neighbors=15))
    assert graph.shape == (8300, 8300)
    _, exact = NearestNeighbors(n_neighbors=15).fit(points).kneighbors(points[:50])
    for cell in range(50):   # the graph is symmetrised, so a cell's edges include its 14 nearest others
        assert set(exact[cell, 1:]) <= set(graph[cell].indices)


def test_the_peers_representation_and_graph_do_not_depend_on_the_thread_count():
    """The PCA and kNN distances run on one BLAS thread inside: without that, their last digits
    moved with the thread count and flipped the bisected Leiden of two experiment folds."""
    from threadpoolctl import threadpool_limits

    from scvae_hier.analysis.leiden import neighbour_graph
    from scvae_hier.analysis.peers import scanpy_representation

    counts = np.random.default_rng(3).poisson(np.random.default_rng(4).gamma(0.5, 2.0, (1, 400)), (1500, 400))
    results = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads):
            representation = scanpy_representation(counts)
            results.append((representation, sparse.csr_matrix(neighbour_graph(representation))))
    (pca_1, graph_1), (pca_2, graph_2) = results
    assert np.array_equal(pca_1, pca_2)
    assert (graph_1 != graph_2).nnz == 0
