"""Seeded synthetic counts with a known hierarchy, for scale benchmarks and tests.

A negative-binomial simulator: a tree of cell-type expression profiles (each child shifts a few
of its parent's genes in log space, so coarse classes differ in more genes than fine ones),
log-normal library sizes, and gamma-Poisson noise. Written to .h5ad a chunk of cells at a time,
so a million cells never need their dense (or even sparse) matrix in memory.
"""
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

CHUNK_CELLS = 10000


def tree_profiles(n_genes, branching=(2, 2, 2), seed=0, changed=0.1, shift=1.5):
    """Log-mean profiles of the leaves [n_leaves, n_genes] and each leaf's class per level.

    The root's log means are N(-1, 1.3^2); every child node shifts a random `changed` share of
    its parent's genes by N(0, shift^2)."""
    rng = np.random.default_rng([seed, 1])
    nodes = [rng.normal(-1.0, 1.3, n_genes)]
    paths = [[]]
    for width in branching:
        children, child_paths = [], []
        for profile, path in zip(nodes, paths):
            for _ in range(width):
                moved = rng.random(n_genes) < changed
                children.append(profile + moved * rng.normal(0.0, shift, n_genes))
                child_paths.append(path + [len(child_paths)])
        nodes, paths = children, child_paths
    return np.stack(nodes), np.array(paths)


def simulate_chunk(profiles, n_cells, rng, library_mean=1500.0, library_sd=0.4, dispersion=2.0):
    """(CSR counts [n_cells, genes] int32, leaf index per cell) of one chunk."""
    leaves = rng.integers(len(profiles), size=n_cells)
    proportions = np.exp(profiles - profiles.max(axis=1, keepdims=True))
    proportions /= proportions.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(library_mean), library_sd, n_cells)
    means = library[:, None] * proportions[leaves]
    rates = means * rng.gamma(dispersion, 1.0 / dispersion, means.shape)
    return sp.csr_matrix(rng.poisson(rates).astype(np.int32)), leaves


def write_h5ad(path, n_cells, n_genes=2000, branching=(2, 2, 2), seed=0, chunk=None):
    """Write `n_cells` synthetic cells to `path` (.h5ad: CSR int32 counts, obs level_1..level_L,
    and the hierarchy in uns, so `scvae-hier train path` finds it). The same arguments give the
    same file (the chunk size included: each chunk draws from its own seeded stream); returns the path."""
    path = Path(path)
    chunk = chunk or CHUNK_CELLS
    profiles, paths = tree_profiles(n_genes, branching, seed)
    levels = [f"level_{i + 1}" for i in range(len(branching))]
    names = [[f"L{i + 1}_{k}" for k in range(int(np.prod(branching[:i + 1])))] for i in range(len(branching))]
    leaf_classes = []
    tmp = path.with_name("tmp-" + path.name)
    with h5py.File(tmp, "w") as handle:
        handle.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        for number, start in enumerate(range(0, n_cells, chunk)):
            rng = np.random.default_rng([seed, 2, number])
            counts, leaves = simulate_chunk(profiles, min(chunk, n_cells - start), rng)
            leaf_classes.append(leaves)
            if start == 0:
                write_elem(handle, "X", counts)
            else:
                sparse_dataset(handle["X"]).append(counts)
        leaves = np.concatenate(leaf_classes)
        obs = pd.DataFrame({level: pd.Categorical(np.array(names[i])[paths[leaves, i]], categories=names[i])
                            for i, level in enumerate(levels)},
                           index=pd.Index([f"cell{i}" for i in range(n_cells)]))
        var = pd.DataFrame(index=pd.Index([f"gene{g}" for g in range(n_genes)]))
        hierarchy = {"label_column": levels[-1], "levels": levels, "labels": names[-1],
                     "paths": {names[-1][leaf]: [names[i][paths[leaf, i]] for i in range(len(levels))]
                               for leaf in range(len(paths))}}
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", var)
        write_elem(handle, "uns", {"hierarchy": hierarchy, "synthetic": {
            "seed": seed, "branching": list(branching), "n_cells": n_cells, "n_genes": n_genes}})
        for empty in ("layers", "obsm", "obsp", "varm", "varp"):
            write_elem(handle, empty, {})
    tmp.replace(path)
    return path
