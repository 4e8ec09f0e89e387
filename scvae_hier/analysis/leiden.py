"""Leiden clustering with exactly K clusters: the resolution is bisected until the partition has
K communities, the way the peers of the reference experiment are given each level's class count.

Leiden has no "number of clusters" argument; its count grows (not strictly monotonically) with
the resolution. `leiden_at_k` brackets K between a resolution giving fewer and one giving more
clusters and bisects the bracket. When no resolution tried gives K (K above the graph's vertex
count, or a count the partitions jump over), it says so, with the nearest counts it found.
"""
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import sparse
from threadpoolctl import threadpool_limits

# The peers' numerical steps (PCA, kNN distances) run on one BLAS thread: their last digits change
# with the thread count and the bisected Leiden on top can flip a near-tied level, so the same cells
# would score differently on a 2-core and an 8-core machine. Measured: PBMC folds 1 and 2 of issue
# 12's experiment, scanpy's level 1 0.28 / -0.07 and level 3 0.71 / 0.81 with 1 / 2 threads.
ONE_THREAD = partial(threadpool_limits, limits=1)


class LeidenCountError(ValueError):
    """No resolution tried gave the asked-for number of clusters."""


@dataclass
class LeidenFit:
    labels: np.ndarray     # [n] cluster index per vertex, 0..n_clusters-1
    resolution: float
    n_clusters: int
    k: int                 # the count asked for

    @property
    def exact(self) -> bool:
        return self.n_clusters == self.k


def _graph(connectivities):
    import igraph

    matrix = sparse.coo_matrix(sparse.triu(sparse.csr_matrix(connectivities), k=1))
    graph = igraph.Graph(n=matrix.shape[0], edges=list(zip(matrix.row.tolist(), matrix.col.tolist())))
    graph.es["weight"] = matrix.data.tolist()
    return graph


def leiden(graph, resolution: float, seed: int = 0) -> np.ndarray:
    """One Leiden partition (RB configuration model, leidenalg's and scanpy's default quality)."""
    import leidenalg

    partition = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition, weights="weight",
                                         resolution_parameter=float(resolution), n_iterations=-1, seed=int(seed))
    return np.asarray(partition.membership)


def leiden_at_k(connectivities, k: int, seed: int = 0, steps: int = 40, strict: bool = True) -> LeidenFit:
    """Leiden on a symmetric weighted graph ([n, n] sparse or dense), resolution bisected to `k`
    clusters. Raises LeidenCountError when no resolution tried gives `k` (with `strict=False` it
    returns the fit whose count is nearest instead; check `.exact`)."""
    n = sparse.csr_matrix(connectivities).shape[0]
    k = int(k)
    if not 1 <= k <= n:
        raise LeidenCountError(f"{k} clusters of {n} cells cannot be made; ask for 1 to {n}.")
    graph = _graph(connectivities)
    tried = {}

    def fit(resolution):
        labels = leiden(graph, resolution, seed)
        fit_ = LeidenFit(labels, float(resolution), int(labels.max()) + 1, k)
        tried[float(resolution)] = fit_
        return fit_

    low, high = 0.0, 1.0
    while fit(high).n_clusters < k and high < 1e4:   # grow the bracket until it holds k
        low, high = high, high * 2
    for _ in range(steps):
        middle = fit((low + high) / 2)
        if middle.exact:
            return middle
        low, high = (middle.resolution, high) if middle.n_clusters < k else (low, middle.resolution)
    for fit_ in tried.values():
        if fit_.exact:
            return fit_
    nearest = min(tried.values(), key=lambda f: (abs(f.n_clusters - k), f.resolution))
    if strict:
        below = max((f.n_clusters for f in tried.values() if f.n_clusters < k), default=None)
        above = min((f.n_clusters for f in tried.values() if f.n_clusters > k), default=None)
        found = " and ".join(f"{count} clusters" for count in (below, above) if count is not None)
        raise LeidenCountError(f"Leiden gave {found} but never {k} in {len(tried)} resolutions between "
                               f"{min(tried):.3g} and {max(tried):.3g} (a graph of m disconnected parts never gives "
                               f"fewer than m); pass strict=False to take the nearest count ({nearest.n_clusters}), "
                               f"or build the graph with more neighbours.")
    return nearest


def neighbour_graph(representation, n_neighbors: int = 15, seed: int = 0):
    """scanpy's k-nearest-neighbour connectivities (UMAP weights) of a cells x dimensions array.
    Exact sklearn kNN: from 8,192 cells scanpy's default (pynndescent) fails with scipy 1.17
    (the neighbours trap in analysis/figures.py)."""
    import anndata
    import scanpy as sc

    adata = anndata.AnnData(np.asarray(representation, dtype=np.float32))
    with ONE_THREAD():  # distances by BLAS: near-tied neighbours must not depend on the thread count
        sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, adata.n_obs - 1), use_rep="X", transformer="sklearn",
                        random_state=seed)
    return adata.obsp["connectivities"]


def leiden_levels(representation, sizes, seed: int = 0, n_neighbors: int = 15) -> list:
    """Leiden at each level's class count K_l on one neighbour graph of `representation`; a list
    of LeidenFit (the nearest count, `.exact` False, where K_l cannot be reached)."""
    graph = neighbour_graph(representation, n_neighbors, seed)
    fits = [leiden_at_k(graph, k, seed=seed, strict=False) for k in sizes]
    for level, fit in enumerate(fits, start=1):
        if not fit.exact:
            warnings.warn(f"Leiden could not make {fit.k} clusters at level {level}; scored with the nearest count, "
                          f"{fit.n_clusters} (resolution {fit.resolution:.3g}).", stacklevel=2)
    return fits
