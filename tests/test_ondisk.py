"""Out-of-core data (scvae_hier.ondisk) against the in-memory path, and the synthetic generator.

The in-memory path (scanpy's seurat_v3, scipy slicing, data.find_outliers) is the independent
computation: on data that fits, both must choose the same cells and genes, hold the same counts,
give the same batches, train to the same loss history and write the same outputs."""
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvae_hier import data, ondisk, synthetic
from scvae_hier.data import CountBatches, DataError



@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks far smaller than the data, so every pass crosses many chunk boundaries."""
    monkeypatch.setattr(ondisk, "CHUNK_CELLS", 97)
    monkeypatch.setattr(ondisk, "OUTPUT_CHUNK_CELLS", 131)


def both(path, tmp_path, **settings):
    """(in-memory prepared AnnData, out-of-core prepared DiskData) of one file and settings."""
    memory = data.prepare(data.read_counts(path), **settings)
    disk = ondisk.prepare(ondisk.read(path), tmp_path / "store", **settings)
    return memory, disk


def test_same_cells_genes_counts_and_record(pbmc_slice, tmp_path, small_chunks):
    memory, disk = both(pbmc_slice, tmp_path, n_genes=120, label_column="source_library",
                        exclude_labels=["cd14_monocytes"])
    assert disk.uns["preprocessing"]["gene_selection"] == "seurat_v3"
    assert list(disk.var_names) == list(memory.var_names)
    assert list(disk.obs_names) == list(memory.obs_names)
    assert disk.uns["preprocessing"] == memory.uns["preprocessing"]
    assert disk.obs.equals(memory.obs)
    np.testing.assert_array_equal(disk.X.toarray(), memory.X.toarray())
    np.testing.assert_array_equal(disk.X.sum(axis=1), np.asarray(memory.X.sum(axis=1)))


def test_given_genes_keep_their_order(pbmc_slice, tmp_path, small_chunks):
    genes = list(anndata.read_h5ad(pbmc_slice).var_names[[50, 3, 400, 7]])
    memory, disk = both(pbmc_slice, tmp_path, genes=genes, drop_empty_cells=True)
    assert list(disk.var_names) == genes
    assert disk.uns["preprocessing"] == memory.uns["preprocessing"]
    assert disk.uns["preprocessing"]["n_cells_empty_dropped"] > 0  # 4 genes leave some cells empty
    np.testing.assert_array_equal(disk.X.toarray(), memory.X.toarray())


def test_batches_are_the_same(pbmc_slice, tmp_path, small_chunks):
    memory, disk = both(pbmc_slice, tmp_path, n_genes=100)
    train = np.random.default_rng(1).random(memory.n_obs) < 0.8
    ours = CountBatches(disk.X[train], 64, shuffle=True, seed=3)
    theirs = CountBatches(memory.X[train], 64, shuffle=True, seed=3)
    for epoch in range(2):
        for index in range(len(theirs)):
            np.testing.assert_array_equal(ours[index]["counts"], theirs[index]["counts"])
        ours.on_epoch_end(), theirs.on_epoch_end()


def test_outliers_found_and_clipped_as_in_memory(pbmc_slice, tmp_path, small_chunks, monkeypatch):
    adata = anndata.read_h5ad(pbmc_slice)
    X = adata.X.tolil()
    X[5, 10], X[300, 11] = 5000, 200000  # far outside their genes' range
    adata.X = sp.csr_matrix(X)
    path = tmp_path / "outliers.h5ad"
    adata.write_h5ad(path)
    monkeypatch.setattr(ondisk, "HISTOGRAM_CAP", 3)  # most genes' 99th percentile then read as a column
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memory, disk = both(path, tmp_path, n_genes=0, outlier_counts="clip")
    messages = [str(w.message) for w in caught if issubclass(w.category, data.OutlierCountWarning)]
    assert len(messages) == 2 and messages[0] == messages[1]
    assert disk.uns["preprocessing"]["n_outlier_counts"] == 2
    np.testing.assert_array_equal(disk.X.toarray(), memory.X.toarray())
    np.testing.assert_array_equal(disk.X.sum(axis=1), np.asarray(memory.X.sum(axis=1)))


def test_refusals_name_the_fix(pbmc_slice, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="needs an .h5ad file"):
        ondisk.read(tmp_path / "counts.loom")
    adata = anndata.read_h5ad(pbmc_slice)
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(DataError, match="rewrite the file with CSR counts"):
        ondisk.prepare(ondisk.read(tmp_path / "csc.h5ad"), tmp_path / "store")
    assert not ondisk.use_out_of_core(pbmc_slice, "auto") and ondisk.use_out_of_core(pbmc_slice, "on")
    monkeypatch.setattr(ondisk, "AUTO_NONZEROS", 1000)
    assert ondisk.use_out_of_core(pbmc_slice, "auto") and not ondisk.use_out_of_core(pbmc_slice, "off")


@pytest.mark.parametrize("model, labels", [
    ("mixture", {}),
    # partial labels: given-label names, the never-labelled cells' scores and the scored-cell counts too
    ("tree", {"labelled": ("level_2=0.2", "level_4=0.05"), "exclude_labels": ("cd14_monocytes",)})])
def test_training_out_of_core_equals_in_memory(pbmc_slice, tmp_path, small_chunks, model, labels):
    """The whole pipeline both ways: loss history, latent, clusters, counts and scores agree."""
    from scvae_hier.options import TrainOptions
    from scvae_hier.training import train

    runs = {}
    for setting in ("off", "on"):
        options = TrainOptions(data=str(pbmc_slice), model=model, output=str(tmp_path / setting),
                               n_genes=80, latent_dim=4, hidden=(16, 16), batch_size=64, xla=False,
                               epochs=2, warm_up=1, out_of_core=setting, **labels)  # conftest.FAST's settings
        runs[setting] = train(options, log=lambda *_: None)
    assert (runs["on"] / "counts" / "data.npy").is_file() and not (runs["off"] / "counts").exists()
    assert not list(tmp_path.glob("tmp-counts-*"))
    histories = {k: pd.read_csv(v / "history.csv") for k, v in runs.items()}
    pd.testing.assert_frame_equal(histories["on"], histories["off"], rtol=1e-5)
    outputs = {k: anndata.read_h5ad(v / "outputs.h5ad") for k, v in runs.items()}
    np.testing.assert_allclose(outputs["on"].obsm["X_scvae"], outputs["off"].obsm["X_scvae"], rtol=1e-4, atol=1e-5)
    for key in outputs["off"].obsm:
        np.testing.assert_allclose(outputs["on"].obsm[key], outputs["off"].obsm[key], rtol=1e-4, atol=1e-5)
    assert outputs["on"].obs.columns.tolist() == outputs["off"].obs.columns.tolist()
    for column in outputs["off"].obs.columns:
        assert (outputs["on"].obs[column].astype(str) == outputs["off"].obs[column].astype(str)).all(), column
    np.testing.assert_array_equal(outputs["on"].X.toarray(), outputs["off"].X.toarray())
    scores = {k: v.uns["scvae"]["metrics"] for k, v in outputs.items()}
    assert scores["on"].keys() == scores["off"].keys() and scores["on"]["ari"].keys() == scores["off"]["ari"].keys()
    for subset in scores["off"]["ari"]:
        assert scores["on"]["ari"][subset] == pytest.approx(scores["off"]["ari"][subset])
    if labels:
        assert "unlabelled" in scores["off"]["ari"] and "scvae_level_4" in outputs["off"].obs
        assert scores["on"]["ari_scored_cells"] == scores["off"]["ari_scored_cells"]
    from scvae_hier.analysis.evaluate import evaluate_run  # out of core too: the run's --out-of-core
    evaluations = {k: evaluate_run(v, iwae_samples=3, batch_size=128) for k, v in runs.items()}
    assert list(evaluations["on"].adata.obs_names) == list(evaluations["off"].adata.obs_names)
    for column in ("scvae_elbo", "scvae_iwae"):
        np.testing.assert_allclose(evaluations["on"].adata.obs[column], evaluations["off"].adata.obs[column], rtol=1e-5)


def test_synthetic_counts_shape_seed_and_hierarchy(tmp_path):
    paths = [synthetic.write_h5ad(tmp_path / f"s{i}.h5ad", 250, 60, branching=(2, 3), seed=seed, chunk=100)
             for i, seed in enumerate((4, 4, 5))]
    first, again, other = (anndata.read_h5ad(p) for p in paths)
    assert first.shape == (250, 60) and first.X.dtype == np.int32
    assert (first.X != again.X).nnz == 0 and first.obs.equals(again.obs)
    assert (first.X != other.X).nnz > 0
    assert first.obs["level_1"].nunique() == 2 and first.obs["level_2"].nunique() == 6
    from scvae_hier.hierarchy import Hierarchy
    hierarchy = Hierarchy.from_anndata(first)
    hierarchy.validate(first.obs["level_2"].astype(str).to_numpy())
    # each leaf's cells nest in one class of the coarser level
    assert (first.obs.groupby("level_2", observed=True)["level_1"].nunique() == 1).all()


def test_synthetic_counts_follow_their_negative_binomial():
    """Means and variances of one leaf's cells at fixed library size against the NB formulas
    mean = mu, variance = mu + mu^2 / r (r = 2), computed independently of the simulator."""
    profiles, _ = synthetic.tree_profiles(40, (2,), seed=0)
    rng = np.random.default_rng(0)
    counts, leaves = synthetic.simulate_chunk(profiles[:1], 20000, rng, library_sd=1e-9)
    proportions = np.exp(profiles[0]) / np.exp(profiles[0]).sum()
    mu = 1500.0 * proportions
    dense = counts.toarray()
    np.testing.assert_allclose(dense.mean(axis=0), mu, rtol=0.05, atol=0.02)
    big = mu > 5
    np.testing.assert_allclose(dense.var(axis=0)[big], (mu + mu ** 2 / 2.0)[big], rtol=0.1)


def test_predictions_do_not_keep_the_cells_alive():
    """Keras keeps every dataset `predict` has iterated (keras-team/keras#13118); write_outputs
    predicts chunk after chunk of a large file, so each chunk must be freed once predicted, or
    1M cells hold 2.4 GB more than one chunk. The counts must be collectable after the call."""
    import gc
    import weakref

    from scvae_hier.models.vae import VAE
    from scvae_hier.outputs import predict_outputs

    model = VAE(n_genes=30, latent_dim=2, hidden=(8,))
    counts = np.random.default_rng(0).poisson(2.0, size=(50, 30)).astype(np.float32)
    alive = weakref.ref(counts)
    assert predict_outputs(model, counts, 16)["latent"].shape == (50, 2)
    del counts
    gc.collect()
    assert alive() is None, "the predicted counts are still referenced after predict_outputs"
