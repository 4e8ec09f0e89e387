"""Shared fixtures: a small slice of the real shipped PBMC cells, written as a user's own file."""
from pathlib import Path

import anndata
import numpy as np
import pytest

PBMC = Path(__file__).resolve().parent.parent / "data" / "pbmc.h5ad"
# Small networks, so CLI tests train in seconds on real cells.
FAST = ["--n-genes", "80", "--latent-dim", "4", "--hidden", "16", "16", "--batch-size", "64"]


@pytest.fixture(scope="session")
def pbmc_slice(tmp_path_factory):
    """600 real cells, 60 from each population, written as a user's own h5ad file."""
    adata = anndata.read_h5ad(PBMC)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(adata.obs["source_library"] == label), 60, replace=False)
                           for label in adata.obs["source_library"].cat.categories])
    path = tmp_path_factory.mktemp("data") / "pbmc_slice.h5ad"
    adata[np.sort(rows)].copy().write_h5ad(path)
    return path
