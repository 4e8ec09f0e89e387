"""Likelihoods against scipy and priors against hand-written logsumexp."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from scipy.special import expit, logsumexp

from scvae_hier.distributions import (component_law, get_likelihood, mixture_prior, nested_mixture_prior)

RNG = np.random.default_rng(0)
X = np.array([0, 0, 1, 3, 7, 20, 150], dtype="float32")
LOG_R = RNG.normal(0.5, 1.0, X.shape).astype("float32")
LOGITS = RNG.normal(0.0, 1.5, X.shape).astype("float32")
LOG_RATE = RNG.normal(1.0, 1.0, X.shape).astype("float32")
DROPOUT = RNG.normal(-1.0, 1.0, X.shape).astype("float32")


def nb_by_scipy(x, log_r, logits):
    # scipy counts failures before n successes with success probability p_s; TFP/scVAE's p is
    # the probability of the counted event, so p_s = 1 - sigmoid(logits).
    return stats.nbinom.logpmf(x, np.exp(log_r), expit(-logits))


def test_negative_binomial_matches_scipy():
    nb = get_likelihood("negative_binomial")
    ours = nb.log_prob(X, {"log_r": LOG_R, "logits": LOGITS}).numpy()
    np.testing.assert_allclose(ours, nb_by_scipy(X, LOG_R, LOGITS), rtol=1e-4, atol=1e-4)
    mean = nb.mean({"log_r": LOG_R, "logits": LOGITS}).numpy()
    np.testing.assert_allclose(mean, stats.nbinom.mean(np.exp(LOG_R), expit(-LOGITS)), rtol=1e-4)


def test_poisson_matches_scipy():
    poisson = get_likelihood("poisson")
    ours = poisson.log_prob(X, {"log_rate": LOG_RATE}).numpy()
    np.testing.assert_allclose(ours, stats.poisson.logpmf(X, np.exp(LOG_RATE)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["zero_inflated_negative_binomial", "zero_inflated_poisson"])
def test_zero_inflated_matches_hand_formula(name):
    law = get_likelihood(name)
    if name.endswith("negative_binomial"):
        params = {"log_r": LOG_R, "logits": LOGITS}
        base = nb_by_scipy(X, LOG_R, LOGITS)
        base_mean = stats.nbinom.mean(np.exp(LOG_R), expit(-LOGITS))
    else:
        params = {"log_rate": LOG_RATE}
        base = stats.poisson.logpmf(X, np.exp(LOG_RATE))
        base_mean = np.exp(LOG_RATE)
    pi = expit(DROPOUT)
    expected = np.where(X == 0, np.log(pi + (1 - pi) * np.exp(base)), np.log(1 - pi) + base)
    ours = law.log_prob(X, {**params, "dropout_logits": DROPOUT}).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(law.mean({**params, "dropout_logits": DROPOUT}).numpy(), (1 - pi) * base_mean,
                               rtol=1e-4)


def test_zero_inflated_pmf_sums_to_one():
    law = get_likelihood("zero_inflated_negative_binomial")
    counts = np.arange(0, 3000, dtype="float32")
    params = {"log_r": np.float32(0.3), "logits": np.float32(1.2), "dropout_logits": np.float32(-0.5)}
    total = np.exp(law.log_prob(counts, params).numpy()).sum()
    assert total == pytest.approx(1.0, abs=1e-4)


def test_unknown_likelihood_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown likelihood 'gaussian'"):
        get_likelihood("gaussian")


def component_logpdf(law, z, loc, scale, df):
    if law == "normal":
        return stats.norm.logpdf(z, loc, scale).sum(-1)
    return stats.t.logpdf(z, df, loc, scale).sum(-1)


@pytest.mark.parametrize("law", ["normal", "student-t"])
def test_flat_mixture_prior_matches_logsumexp(law):
    K, D = 4, 3
    loc = RNG.normal(size=(K, D)).astype("float32")
    scale = RNG.uniform(0.5, 2.0, (K, D)).astype("float32")
    df = RNG.uniform(2.0, 8.0, (K, 1)).astype("float32")
    logits = RNG.normal(size=K).astype("float32")
    z = RNG.normal(size=(5, D)).astype("float32")
    prior = mixture_prior(logits, component_law(law, loc, scale, df if law == "student-t" else None))
    log_pi = logits - logsumexp(logits)
    expected = logsumexp(log_pi + component_logpdf(law, z[:, None, :], loc, scale, df), axis=1)
    np.testing.assert_allclose(prior.log_prob(z).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("law", ["normal", "student-t"])
def test_nested_mixture_prior_matches_sum_over_paths(law):
    sizes, D = (2, 3, 4), 2
    loc = RNG.normal(size=sizes + (D,)).astype("float32")
    scale = RNG.uniform(0.5, 2.0, sizes + (D,)).astype("float32")
    df = RNG.uniform(2.0, 8.0, sizes + (1,)).astype("float32")
    level_logits = [RNG.normal(size=sizes[: l + 1]).astype("float32") for l in range(len(sizes))]
    z = RNG.normal(size=(6, D)).astype("float32")
    prior = nested_mixture_prior(level_logits, component_law(law, loc, scale, df if law == "student-t" else None))
    assert prior.batch_shape == [] and prior.event_shape == [D]
    # Brute force: enumerate every path (k1, k2, k3) with p(k1) p(k2|k1) p(k3|k1,k2).
    log_p = [l - logsumexp(l, axis=-1, keepdims=True) for l in level_logits]
    terms = []
    for k1 in range(sizes[0]):
        for k2 in range(sizes[1]):
            for k3 in range(sizes[2]):
                path_log_prob = log_p[0][k1] + log_p[1][k1, k2] + log_p[2][k1, k2, k3]
                terms.append(path_log_prob + component_logpdf(law, z, loc[k1, k2, k3], scale[k1, k2, k3],
                                                              df[k1, k2, k3]))
    expected = logsumexp(np.stack(terms), axis=0)
    np.testing.assert_allclose(prior.log_prob(z).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_mixture_prior_samples_follow_the_weights():
    loc = np.array([[-10.0], [0.0], [10.0]], dtype="float32")
    scale = np.ones_like(loc)
    logits = np.log(np.array([0.2, 0.3, 0.5], dtype="float32"))
    prior = mixture_prior(logits, component_law("normal", loc, scale))
    samples = prior.sample(20000, seed=1).numpy()[:, 0]
    shares = [(samples < -5).mean(), ((samples > -5) & (samples < 5)).mean(), (samples > 5).mean()]
    np.testing.assert_allclose(shares, [0.2, 0.3, 0.5], atol=0.015)
    assert tf.reduce_all(tf.math.is_finite(prior.log_prob(samples[:, None])))


@pytest.mark.parametrize("likelihood", ["negative_binomial", "zero_inflated_negative_binomial"])
def test_gene_dispersion_decoder_matches_scipy_over_clusters(likelihood):
    """One r per gene: the lgamma part computed once per cell must equal the full density of
    every cluster's parameters (scipy, and the zero-inflated law by hand)."""
    from scvae_hier.models.layers import CountDecoder

    rng = np.random.default_rng(1)
    B, K, G = 3, 4, 5
    decoder = CountDecoder(G, (8,), likelihood, "none", dispersion="gene")
    assert set(decoder.heads) == ({"logits", "dropout_logits"} if "zero" in likelihood else {"logits"})
    decoder.gene_log_r.assign(rng.normal(0.3, 1.0, G).astype("float32"))
    params = decoder(tf.constant(rng.normal(size=(B, K, 2)), tf.float32))
    x = rng.poisson(3.0, (B, G)).astype("float32")
    x[0, :2] = 0
    ours = decoder.log_prob(tf.constant(x), params).numpy()  # [B, K]
    log_r = np.broadcast_to(decoder.gene_log_r.numpy(), (B, K, G))
    nb = nb_by_scipy(x[:, None, :], log_r, params["logits"].numpy())
    if "zero" in likelihood:
        pi = expit(params["dropout_logits"].numpy())
        nb = np.where(x[:, None, :] == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log(1 - pi) + nb)
    np.testing.assert_allclose(ours, nb.sum(-1), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="negative-binomial likelihoods"):
        CountDecoder(G, (8,), "poisson", dispersion="gene")
    with pytest.raises(ValueError, match="Unknown dispersion"):
        CountDecoder(G, (8,), dispersion="cluster")


def test_gene_dispersion_model_saves_and_reloads(tmp_path):
    import keras
    from scvae_hier.models import MixtureVAE

    model = MixtureVAE(6, n_components=3, latent_dim=2, hidden=(8,), dispersion="gene")
    model.build()
    model.decoder.gene_log_r.assign(np.linspace(-1, 1, 6).astype("float32"))
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert again.dispersion == "gene" and "log_r" not in again.decoder.heads
    x = tf.constant(np.random.default_rng(0).poisson(2.0, (4, 6)).astype("float32"))
    np.testing.assert_array_equal(again.decoder.gene_log_r.numpy(), model.decoder.gene_log_r.numpy())
    np.testing.assert_allclose(again.outputs(x)["latent"].numpy(), model.outputs(x)["latent"].numpy())
