"""The tuning options: an observed size factor in the count law, a one-hot batch covariate on the
encoder and decoder inputs, and the depth-normalised log1p input."""
import json

import anndata
import keras
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tensorflow as tf

from scvae_hier.cli import main
from scvae_hier.data import CountBatches, DataError
from scvae_hier.models import IndMoMVAE, MixtureVAE, MoMixVAE, VAE
from scvae_hier.runs import RunDirectory, load_model
from scvae_hier.data import batch_covariates

G, D = 12, 3
BATCHES = ["a", "b", "c"]


def counts(n=40, seed=0):
    return np.random.default_rng(seed).poisson(3.0, size=(n, G)).astype("float32")


def one_hot(n=40, seed=0):
    return np.eye(len(BATCHES), dtype="float32")[np.random.default_rng(seed).integers(0, len(BATCHES), n)]


@pytest.mark.parametrize("likelihood", ["negative_binomial", "poisson", "zero_inflated_negative_binomial"])
def test_observed_size_factor_makes_the_mean_proportional_to_the_library(likelihood):
    model = MixtureVAE(G, n_components=2, latent_dim=D, hidden=(6,), likelihood=likelihood, library_size="observed")
    model.build()
    z = tf.random.stateless_normal((5, 2, D), seed=(1, 2))
    x = tf.constant(counts(5))
    mean = model.decoder.likelihood.mean(model.decode(z, x))                       # [5, 2, G]
    doubled = model.decoder.likelihood.mean(model.decode(z, 2.0 * x))
    np.testing.assert_allclose(doubled.numpy(), 2.0 * mean.numpy(), rtol=1e-5)
    if not likelihood.startswith("zero_inflated"):  # the means share out exactly the observed total
        np.testing.assert_allclose(tf.reduce_sum(mean, -1).numpy(),
                                   np.broadcast_to(x.numpy().sum(1, keepdims=True), (5, 2)), rtol=1e-4)


def test_without_size_factor_the_mean_ignores_the_library():
    model = MixtureVAE(G, n_components=2, latent_dim=D, hidden=(6,))
    model.build()
    z = tf.random.stateless_normal((5, 2, D), seed=(1, 2))
    x = tf.constant(counts(5))
    mean = model.decoder.likelihood.mean(model.decode(z, x))
    np.testing.assert_array_equal(mean.numpy(), model.decoder.likelihood.mean(model.decode(z, 3.0 * x)).numpy())


def test_covariate_changes_decoder_and_encoder_outputs():
    model = MoMixVAE(G, level_sizes=(2, 3), latent_dim=D, hidden=(6,), covariates=BATCHES)
    model.build()
    x = tf.constant(counts(4))
    z = tf.random.stateless_normal((4, 3, D), seed=(3, 4))
    first, second = np.eye(3, dtype="float32")[[0] * 4], np.eye(3, dtype="float32")[[1] * 4]
    decoded = [model.decode(z, x, c)["logits"].numpy() for c in (first, second)]
    assert not np.allclose(*decoded)
    latent = [model.outputs(x, c)["latent"].numpy() for c in (first, second)]
    assert not np.allclose(*latent)


def test_without_encode_covariates_only_the_decoder_sees_the_batch():
    from scvae_hier.models import TreeVAE
    model = TreeVAE(G, level_sizes=(2, 3), parents=[[0, 1, 1]], latent_dim=D, hidden=(6,), covariates=BATCHES,
                    encode_covariates=False)
    model.build()
    x = tf.constant(counts(4))
    first, second = np.eye(3, dtype="float32")[[0] * 4], np.eye(3, dtype="float32")[[1] * 4]
    # the encoder's first kernel takes the genes alone; the latent is the same whatever the batch
    assert model.encoder_input(x, first).shape == (4, G)
    latent = [model.outputs(x, c)["latent"].numpy() for c in (first, second)]
    np.testing.assert_array_equal(*latent)
    z = tf.random.stateless_normal((4, 3, D), seed=(3, 4))
    decoded = [model.decode(z, x, c)["logits"].numpy() for c in (first, second)]
    assert not np.allclose(*decoded)
    assert model.get_config()["encode_covariates"] is False


@pytest.mark.parametrize("make", [
    lambda: MoMixVAE(G, level_sizes=(2, 3), latent_dim=D, hidden=(6,), covariates=BATCHES, library_size="observed"),
    lambda: MixtureVAE(G, n_components=3, latent_dim=D, hidden=(6,), covariates=BATCHES, encode_covariates=False),
    lambda: MixtureVAE(G, n_components=3, latent_dim=D, hidden=(6,), covariates=BATCHES, library_size="observed",
                       input_transform="normalised_log1p", likelihood="poisson"),
    lambda: IndMoMVAE(G, level_sizes=(2, 3), latent_dim=D, hidden=(6, 4), covariates=BATCHES,
                      usage_level_weights=(0.1, 1.0)),
    lambda: VAE(G, latent_dim=D, hidden=(6,), covariates=BATCHES, library_size="observed"),
])
def test_covariate_model_trains_saves_and_reloads_bit_identically(tmp_path, make):
    model = make()
    model.build()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    x, c = counts(), one_hot()
    model.fit(CountBatches(x, 8, shuffle=True, covariates=c), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_config() == model.get_config() and loaded.covariates == tuple(BATCHES)
    before = model.predict(CountBatches(x, 16, covariates=c), verbose=0)
    after = loaded.predict(CountBatches(x, 16, covariates=c), verbose=0)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    weights = loaded.log_importance_weights(tf.constant(x[:4]), 3, covariates=tf.constant(c[:4]))
    assert weights.shape == (3, 4) and np.isfinite(weights.numpy()).all()


def test_covariate_model_refuses_counts_without_covariates():
    model = MixtureVAE(G, n_components=2, latent_dim=D, hidden=(6,), covariates=BATCHES)
    model.build()
    with pytest.raises(ValueError, match=r"trained with covariates \['a', 'b', 'c'\]"):
        model.terms(tf.constant(counts(3)))


def test_normalised_log1p_input_ignores_sequencing_depth():
    model = MixtureVAE(G, n_components=2, latent_dim=D, hidden=(6,), input_transform="normalised_log1p")
    x = tf.constant(counts(4))
    np.testing.assert_allclose(model.encoder_input(x).numpy(), model.encoder_input(5.0 * x).numpy(), rtol=1e-5)


def test_batch_covariates_are_one_hot_in_sorted_category_order():
    obs = pd.DataFrame({"source": ["y", "x", "y", "z"]})
    values, names = batch_covariates(obs, "source")
    assert names == ["x", "y", "z"]
    np.testing.assert_array_equal(values, np.eye(3)[[1, 0, 1, 2]])
    assert batch_covariates(obs, None) == (None, [])
    with pytest.raises(DataError, match="'batch' is not an obs column") as refused:
        batch_covariates(obs, "batch")
    assert "--batch NAME" not in str(refused.value)                 # training: no model to read cells as
    with pytest.raises(DataError, match=r"trained with batches \['x', 'y'\]: add the column, or .*--batch NAME"):
        batch_covariates(obs, "batch", ["x", "y"])                  # a trained model's query
    with pytest.raises(DataError, match="missing for 1 cells"):
        batch_covariates(pd.DataFrame({"source": ["x", None]}), "source")
    # Evaluation passes the model's categories: their order, not the data's, sets the columns.
    values, names = batch_covariates(pd.DataFrame({"source": ["z", "x"]}), "source", ["x", "y", "z"])
    np.testing.assert_array_equal(values, np.eye(3)[[2, 0]])
    with pytest.raises(DataError, match=r"categories \['w'\] that the model was not trained with"):
        batch_covariates(pd.DataFrame({"source": ["w", "x"]}), "source", ["x", "y", "z"])


def test_cli_trains_with_batch_key_and_size_factor_and_reloads_exactly(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    obs = pd.DataFrame({"cell_type": rng.choice(["t1", "t2"], n), "batch": rng.choice(["b1", "b2"], n)},
                       index=[f"c{i}" for i in range(n)])
    data = tmp_path / "cells.h5ad"
    anndata.AnnData(X=sp.csr_matrix(rng.poisson(2.0, (n, 30)).astype("float32")), obs=obs).write_h5ad(data)
    out = tmp_path / "run"
    assert main(["train", str(data), "--model", "mixture", "--label-column", "cell_type", "--n-genes", "0",
                 "--epochs", "2", "--warm-up", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "32",
                 "--batch-key", "batch", "--library-size", "observed", "--no-xla", "--output", str(out)]) == 0
    run = RunDirectory(out)
    config = run.read_config()
    assert config["options"]["batch_key"] == "batch" and config["options"]["library_size"] == "observed"
    assert config["model_arguments"]["covariates"] == ["b1", "b2"]
    model = load_model(out)
    assert model.covariates == ("b1", "b2") and model.library_size == "observed"
    cells = anndata.read_h5ad(run.outputs)
    c, _ = batch_covariates(cells.obs, "batch")
    again = model.predict(CountBatches(cells.X, 1024, covariates=c), verbose=0)
    np.testing.assert_array_equal(again["latent"], cells.obsm["X_scvae"])
    np.testing.assert_array_equal(again["cluster_probabilities"], cells.obsm["scvae_cluster_probabilities"])
    assert json.loads(run.metrics.read_text())["epochs_run"] == 2

    # Evaluation feeds each cell's covariate too; a batch the model never saw is refused.
    assert main(["evaluate", str(out), "--set", "all", "--iwae-samples", "4"]) == 0
    evaluated = anndata.read_h5ad(out / "evaluation" / "all" / "cells.h5ad")
    np.testing.assert_array_equal(evaluated.obsm["X_scvae"], cells.obsm["X_scvae"])
    other = anndata.read_h5ad(data)
    other.obs["batch"] = other.obs["batch"].astype(str).replace("b2", "b3")
    other.write_h5ad(tmp_path / "other.h5ad")
    assert main(["evaluate", str(out), "--data", str(tmp_path / "other.h5ad")]) == 2


@pytest.mark.parametrize("cls", [MoMixVAE, IndMoMVAE])
def test_usage_level_weights_scale_each_level_of_the_usage_kl(cls):
    x = tf.constant(counts(16))
    terms = {}
    for weights in [(1.0, 0.0), (0.0, 1.0), (2.0, 3.0)]:
        keras.utils.set_random_seed(0)
        model = cls(G, level_sizes=(2, 3), latent_dim=D, hidden=(6,), usage_level_weights=weights)
        model.build()
        terms[weights] = model.terms(x, noise=tf.zeros((16, 3 if cls is MoMixVAE else 5, D)))["marginal_usage"]
    np.testing.assert_allclose(terms[(2.0, 3.0)], 2 * terms[(1.0, 0.0)] + 3 * terms[(0.0, 1.0)], rtol=1e-5)
    with pytest.raises(ValueError, match="one non-negative weight per level"):
        cls(G, level_sizes=(2, 3), usage_level_weights=(1.0,))
