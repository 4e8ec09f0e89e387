"""Query batches the reference never saw (scArches' surgery, scvae_hier.query): the extended model
is the trained one on the training batches, fitting moves only the new batches' weights and
raises the query's ELBO above reading it as any training batch, the result saves, loads and
annotates through the CLI, and the cases with nothing to fit are refused by name."""
import anndata
import keras
import numpy as np
import pytest
import tensorflow as tf

import scvae_hier as sh
from scvae_hier.data import DataError, batch_covariates, prepare
from scvae_hier.models import IndMoMVAE, MixtureVAE, MoMixVAE, VAE
from scvae_hier.query import extend_batches

LEVELS = ["level_1", "level_2", "level_3", "level_4"]


@pytest.fixture(scope="module")
def reference_and_query(pbmc_slice):
    """A semi-supervised TreeVAE trained with source_dataset as its batch on fastTopics and
    scMINER cells; the MUDAN cells, a study it never saw, are the query (their counts scaled on
    half the genes, so the new batch differs from every training one)."""
    adata = anndata.read_h5ad(pbmc_slice)
    reference = adata[adata.obs["source_dataset"] != "MUDAN"].copy()
    query = adata[adata.obs["source_dataset"] == "MUDAN"].copy()
    X = query.X.toarray()
    X[:, ::2] *= 3
    query.X = X.astype(np.float32)
    sh.TreeVAE.setup_anndata(reference, levels=LEVELS, batch_key="source_dataset")
    model = sh.TreeVAE(reference, semi_supervised=True, n_genes=80, latent_dim=4, hidden=(16, 16), xla=False)
    model.train(max_epochs=3, batch_size=64, progress_bar=False)
    return model, reference, query


def _query_elbo(model, query, batch=None):
    """Mean ELBO of the query cells under `model`, reading them as `batch` if given."""
    meta = model.module.metadata
    cells = query.copy()
    if batch is not None:
        cells.obs["source_dataset"] = batch
    prepared = prepare(cells, genes=meta["genes"])
    covariates, _ = batch_covariates(prepared.obs, "source_dataset", list(model.module.covariates))
    x = tf.constant(prepared.X.toarray() if hasattr(prepared.X, "toarray") else prepared.X, tf.float32)
    terms = model.module.terms(x, training=False, noise=tf.zeros((x.shape[0], 4)), covariates=tf.constant(covariates))
    return float(tf.reduce_mean(terms["elbo"]))


def test_the_extended_model_is_the_trained_one_on_its_training_batches(reference_and_query):
    model, reference, _ = reference_and_query
    extended, grown = extend_batches(model.module, ["MUDAN"])
    assert extended.covariates == (*model.module.covariates, "MUDAN")
    assert len(grown) == 2                                        # the encoder's and the decoder's input kernels
    X = prepare(reference, genes=model.module.metadata["genes"]).X.toarray().astype(np.float32)
    old, _ = batch_covariates(reference.obs, "source_dataset", list(model.module.covariates))
    new = np.hstack([old, np.zeros((len(old), 1), np.float32)])
    before, after = model.module.outputs(X, old), extended.outputs(X, new)
    np.testing.assert_allclose(after["latent"], before["latent"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after["level_4_probabilities"], before["level_4_probabilities"], atol=1e-5)
    for variable, mask in grown:                                  # new rows start at the training batches' mean
        value = keras.ops.convert_to_numpy(variable)
        np.testing.assert_allclose(value[-1], value[-3:-1].mean(axis=0), rtol=1e-6, atol=1e-7)
        assert mask[-1].all() and not mask[:-1].any()


def test_fitting_moves_only_the_new_rows_and_beats_every_training_batch(reference_and_query, tmp_path, capsys):
    model, reference, query = reference_and_query
    fitted = model.fit_new_batches(query, max_epochs=30, batch_size=64, learning_rate=1e-2)
    assert len(fitted.query_history) == 30 and np.isfinite(fitted.query_history).all()
    start, _ = extend_batches(model.module, ["MUDAN"])
    changed = []
    for a, b in zip(start.weights, fitted.module.weights):
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        if a.dtype.kind == "f" and a.ndim == 2 and a.shape[0] > 3 and not np.array_equal(a, b):
            changed.append(b.shape)
            np.testing.assert_array_equal(a[:-1], b[:-1])          # the trained rows are untouched
    assert len(changed) == 2
    for a, b in zip(start.weights, fitted.module.weights):       # every other weight is as trained
        if a.ndim != 2 or a.shape[0] <= 3:
            if "noise_draws" not in a.path:
                np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    # The reference's cells get the very same predictions through the fitted model (their novelty
    # to float rounding: the decoder's input has one more, zero, covariate column).
    got, want = (m.predict_levels(reference, keep_labels=False) for m in (fitted, model))
    np.testing.assert_array_equal(got.drop(columns="scvae_novelty").astype(str).to_numpy(),
                                  want.drop(columns="scvae_novelty").astype(str).to_numpy())
    np.testing.assert_allclose(got["scvae_novelty"], want["scvae_novelty"], atol=1e-4)
    # The fitted batch explains the query better than any training batch it could be read as.
    fitted_elbo = _query_elbo(fitted, query)
    for batch in model.module.covariates:
        assert fitted_elbo > _query_elbo(model, query, batch) + 1.0, batch
    paths = {tuple(p) for p in model.hierarchy.paths.values()}
    named = fitted.predict_levels(query)[[f"scvae_{level}" for level in LEVELS]].astype(str).to_numpy()
    assert all(tuple(p) in paths for p in named)
    # Saved and loaded, it gives the same names; the CLI runs the same fit.
    fitted.save(tmp_path / "fitted")
    loaded = sh.load(tmp_path / "fitted")
    assert loaded.module.covariates[-1] == "MUDAN" and loaded.module.metadata["query_batches"] == ["MUDAN"]
    np.testing.assert_array_equal(loaded.predict_levels(query).astype(str).to_numpy(),
                                  fitted.predict_levels(query).astype(str).to_numpy())
    from scvae_hier.cli import main
    model.save(tmp_path / "reference")
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["annotate", str(tmp_path / "reference"), str(tmp_path / "query.h5ad"), "--output",
                 str(tmp_path / "annotated.h5ad"), "--fit-new-batches", "--query-epochs", "3",
                 "--save-model", str(tmp_path / "cli_fitted")]) == 0
    assert "Fitted the query's new batch(es) ['MUDAN'] for 3 epochs" in capsys.readouterr().out
    annotated = anndata.read_h5ad(tmp_path / "annotated.h5ad")
    assert list(annotated.uns["scvae_annotation"]["fitted_batches"]) == ["MUDAN"]
    assert sh.load(tmp_path / "cli_fitted").module.covariates[-1] == "MUDAN"
    assert main(["annotate", str(tmp_path / "reference"), str(tmp_path / "query.h5ad"), "--output",
                 str(tmp_path / "x.h5ad"), "--fit-new-batches", "--batch", "scMINER"]) == 2
    assert "not both" in capsys.readouterr().err


def test_nothing_to_fit_is_refused_by_name(reference_and_query, pbmc_slice):
    model, reference, query = reference_and_query
    with pytest.raises(sh.api.SetupError, match="nothing new to fit"):
        model.fit_new_batches(reference[:40].copy(), max_epochs=1)
    bare = query.copy()
    del bare.obs["source_dataset"]
    with pytest.raises(DataError, match="no obs column 'source_dataset'"):
        model.fit_new_batches(bare, max_epochs=1)
    plain = anndata.read_h5ad(pbmc_slice)[:200].copy()
    sh.VAE.setup_anndata(plain)
    unbatched = sh.VAE(plain, n_genes=40, latent_dim=2, hidden=(8,), xla=False)
    unbatched.train(max_epochs=1, batch_size=64, progress_bar=False)
    with pytest.raises(sh.api.SetupError, match="trained without a batch covariate"):
        unbatched.fit_new_batches(query, max_epochs=1)


def test_a_query_batch_the_model_never_saw_is_refused_unless_read_as_a_training_one(reference_and_query):
    """Predicting cells of a batch the reference was not trained on is refused, naming it (fit it
    with `fit_new_batches`, or read it as a training batch); a batch to read them as must be one
    of the training batches; read as one, every cell gets a path."""
    model, reference, _ = reference_and_query
    query = reference[:20].copy()
    query.obs["source_dataset"] = "new_study"
    with pytest.raises(DataError, match="new_study") as refused:
        model.predict_levels(query)
    assert "--batch NAME" in str(refused.value) and "fit_new_batches" in str(refused.value)   # the fixes, named
    with pytest.raises(sh.api.SetupError, match="not one of the model's training batches"):
        model.predict_levels(query, batch="nope")
    named = model.predict_levels(query, batch="scMINER")
    assert named["scvae_level_4"].notna().all()
    np.testing.assert_array_equal(named["scvae_level_4"].astype(str),
                                  model.predict_levels(reference[:20].copy(), batch="scMINER")["scvae_level_4"].astype(str))


@pytest.mark.parametrize("make", [
    lambda: MoMixVAE(12, level_sizes=(2, 3), latent_dim=3, hidden=(6,), covariates=("a", "b"), library_size="observed"),
    lambda: MixtureVAE(12, n_components=3, latent_dim=3, hidden=(6,), covariates=("a", "b"), likelihood="poisson"),
    lambda: IndMoMVAE(12, level_sizes=(2, 3), latent_dim=3, hidden=(6, 4), covariates=("a", "b")),
    lambda: VAE(12, latent_dim=3, hidden=(6,), covariates=("a", "b"), normalisation="layer"),
    lambda: MixtureVAE(12, n_components=3, latent_dim=3, hidden=(6,), covariates=("a", "b"), encode_covariates=False),
])
def test_every_model_extends_without_changing_its_training_batches(make):
    """The covariate rows are the last input rows of every kernel that takes them, in every model:
    otherwise appending a column would shift another input's rows and change these outputs."""
    model = make()
    model.build()
    x = np.random.default_rng(0).poisson(3.0, size=(10, 12)).astype(np.float32)
    old = np.eye(2, dtype=np.float32)[np.arange(10) % 2]
    extended, grown = extend_batches(model, ["c", "d"])
    assert grown and all(mask[-2:].all() and not mask[:-2].any() for _, mask in grown)
    before, after = model.outputs(x, old), extended.outputs(x, np.hstack([old, np.zeros((10, 2), np.float32)]))
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be new.*\['a'\]"):
        extend_batches(model, ["a", "e"])
