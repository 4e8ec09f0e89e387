"""Shared fixtures: the shipped PBMC cells read once per session, a small slice of them written as a
user's own file, and a recorder of the figures a command draws; and the order in which the two
pytest-xdist workers get the test modules.

Paths come from this file's location, never from the working directory."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
PBMC = DATA / "pbmc.h5ad"
PBMC_HIERARCHY = DATA / "pbmc_hierarchy.tsv"
# Small networks and no XLA, so CLI tests train in seconds on real cells. XLA (the default) is
# covered by the one test that trains without these arguments' --no-xla (test_training.py).
FAST = ["--n-genes", "80", "--latent-dim", "4", "--hidden", "16", "16", "--batch-size", "64", "--no-xla"]


# Test modules by their time on one worker (`--durations`, 2026-12-04), longest first; the rest
# follow in file order.
LONGEST_FIRST = ["test_refit", "test_training", "test_evaluate_cli", "test_experiment", "test_partial_labels",
                 "test_tutorial", "test_api", "test_tree", "test_tuning_options", "test_query",
                 "test_semi_supervised_models", "test_hierarchical", "test_bad_input", "test_packaging",
                 "test_tree_defaults", "test_markers", "test_ondisk"]


def pytest_collection_modifyitems(config, items):
    """For the README's `-n 2 --dist loadfile --no-loadscope-reorder`: each test module goes to one
    pytest-xdist worker whole, so a module-scoped fixture (a trained model) is built once, not once
    per worker as `--dist load` did (the refit, query, evaluate and API models: about 200 s of
    training twice); and the longest modules are handed out first, so that no long module starts
    while the other worker has nothing left (xdist's own order, by number of tests, left one
    worker alone for 5 minutes). Without xdist only the order changes."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def no_graph_rewrites():
    """Graph-mode training without XLA spends most of its first step in TensorFlow's graph
    optimiser (grappler): 52 s against 12 s for a small MoMixVAE's first epoch under load here,
    later epochs unchanged. The tests train a few epochs of many small models, so they turn it
    off; it rewrites graphs for speed and changes no result a test checks. Set only when a test
    module has imported TensorFlow (so a test that needs TensorFlow unloaded still finds it so)."""
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    yield


@pytest.fixture(scope="session")
def pbmc():
    """The shipped data (9,149 cells x 8,149 genes) through the package's reader, read once per
    session (16 MB): tests that need real cells slice it; none may modify it."""
    from scvae_hier.data import read_counts
    return read_counts(PBMC)


@pytest.fixture(scope="session")
def pbmc_slice(pbmc, tmp_path_factory):
    """600 real cells, 60 from each population, written as a user's own h5ad file (integer counts,
    as in the shipped file)."""
    import scipy.sparse as sp
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(pbmc.obs["source_library"] == label), 60, replace=False)
                           for label in pbmc.obs["source_library"].cat.categories])
    adata = pbmc[np.sort(rows)].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.int32)
    path = tmp_path_factory.mktemp("data") / "pbmc_slice.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture
def drawn_figures(monkeypatch):
    """Every matplotlib figure saved while the test runs, by file name: {name: Figure}. The file
    is still written; the test asserts what the figure shows (panels, titles, points)."""
    from matplotlib.figure import Figure
    drawn = {}
    save = Figure.savefig

    def recording_savefig(self, fname, *args, **kwargs):
        drawn[Path(fname).name] = self
        return save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return drawn


def scatter_points(ax):
    """Number of points in each scatter collection of an axes."""
    return [len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets")]
