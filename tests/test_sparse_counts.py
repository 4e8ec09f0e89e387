"""The NB lgamma terms at non-zero counts only (distributions.lgamma_ratio_sum) against the dense
sum over every entry and against scipy: values and gradients, both dispersion modes, NB and ZINB,
over a cluster axis and path axes, empty batches, one dense cell, large counts."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from scipy.special import expit

from scvae_hier.distributions import (BATCH_SPARSE_SHARE, RISING_TERMS, SPARSE_SHARE, batch_sparse_lgamma_ratio_sum,
                                      dense_lgamma_ratio_sum, lgamma_ratio_sum, rising_lgamma_ratio,
                                      rising_lgamma_ratio_sum, sparse_lgamma_ratio_sum)
from scvae_hier.models.layers import CountDecoder

B, G = 12, 40


def counts(density, seed=0, scale=3.0):
    """Counts [B, G] with about `density` of them non-zero."""
    rng = np.random.default_rng(seed)
    x = (rng.random((B, G)) < density) * (1 + rng.poisson(scale, (B, G)))
    return x.astype("float32")


def batches():
    """Batches for every path of lgamma_ratio_sum: all zeros, sparse ones, the dense fallbacks
    (60%: too many non-zero entries for the batch path; one cell with every gene non-zero among
    empty cells: too many for the per-cell path, not for the batch path), large counts."""
    one_dense_cell = np.zeros((B, G), "float32")
    one_dense_cell[3] = np.arange(1, G + 1)
    large = counts(0.1, seed=3)
    large[large > 0] *= 5000.0
    return {"zeros": np.zeros((B, G), "float32"), "5%": counts(0.05), "20%": counts(0.2, seed=1),
            "60% (dense path)": counts(0.6, seed=2), "one dense cell (dense path)": one_dense_cell, "large counts": large}


def value_and_grad(fn, x, r):
    with tf.GradientTape() as tape:
        tape.watch(r)
        value = fn(tf.constant(x), r)
        weighted = tf.reduce_sum(value * tf.range(1.0, 1.0 + value.shape[-1]))   # a different weight per column
    return value.numpy(), tape.gradient(weighted, r).numpy()


@pytest.mark.parametrize("name", list(batches()))
def test_sparse_sum_equals_dense_values_and_gradients(name):
    x = batches()[name]
    r = tf.constant(np.exp(np.random.default_rng(4).normal(0.0, 2.0, (B, 3, G))).astype("float32"))
    dense, dense_grad = value_and_grad(dense_lgamma_ratio_sum, x, r)
    per_cell, per_batch = int(SPARSE_SHARE * G), int(BATCH_SPARSE_SHARE * B * G)
    sparse = [lgamma_ratio_sum, rising_lgamma_ratio_sum]         # each sparse path itself, where it is exact
    sparse += [lambda x, r: sparse_lgamma_ratio_sum(x, r, per_cell)] * bool((x > 0).sum(-1).max() <= per_cell)
    sparse += [lambda x, r: batch_sparse_lgamma_ratio_sum(x, r, per_batch)] * bool((x > 0).sum() <= per_batch)
    assert len(sparse) == {"60% (dense path)": 2, "one dense cell (dense path)": 3}.get(name, 4)
    for fn in sparse:
        ours, grad = value_and_grad(fn, x, r)
        np.testing.assert_allclose(ours, dense, rtol=1e-6, atol=1e-3 if name == "large counts" else 1e-5)
        # the rising-factorial form computes digamma differences another way: float32 rounding apart
        # (checked against scipy in float64 below)
        np.testing.assert_allclose(grad, dense_grad, rtol=1e-6 if fn is not rising_lgamma_ratio_sum else 1e-5,
                                   atol=1e-6 if fn is not rising_lgamma_ratio_sum else 1e-5)
    if not x.any():
        assert not dense.any() and not dense_grad.any()


def test_sparse_sum_matches_scipy_lgamma():
    from scipy.special import gammaln

    x = counts(0.1, seed=5)
    r = np.exp(np.random.default_rng(6).normal(0.0, 1.0, (B, 2, G)))
    expected = (gammaln(x[:, None] + r) - gammaln(r)).sum(-1)
    ours = lgamma_ratio_sum(tf.constant(x), tf.constant(r.astype("float32"))).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)


def decoder_and_params(likelihood, dispersion, extra_shape, seed=0):
    rng = np.random.default_rng(seed)
    decoder = CountDecoder(G, (8,), likelihood, "none", dispersion=dispersion)
    params = decoder(tf.constant(rng.normal(size=(B, *extra_shape, 2)), tf.float32))
    if dispersion == "gene":
        decoder.gene_log_r.assign(rng.normal(0.3, 1.0, G).astype("float32"))
        params = decoder(tf.constant(rng.normal(size=(B, *extra_shape, 2)), tf.float32))
    return decoder, params


def log_prob_and_grads(decoder, x, params):
    params = {name: tf.identity(value) for name, value in params.items()}
    with tf.GradientTape() as tape:
        tape.watch(list(params.values()))
        value = decoder.log_prob(tf.constant(x), params)
    sources = list(params.values()) + decoder.trainable_variables
    return value.numpy(), [g.numpy() for g in tape.gradient(tf.reduce_sum(value), sources) if g is not None]


CASES = [(likelihood, dispersion, extra) for likelihood in ("negative_binomial", "zero_inflated_negative_binomial")
         for dispersion in ("cell", "gene") for extra in ((), (5,), (2, 3))]


@pytest.mark.parametrize("likelihood,dispersion,extra_shape", CASES)
def test_decoder_log_prob_sparse_equals_dense(likelihood, dispersion, extra_shape):
    """Over no extra axis (VAE), a cluster axis [B, K, G] and path axes [B, K_1, K_2, G]: the
    default decoder against one whose lgamma ratio is summed over every entry (the old way)."""
    decoder, params = decoder_and_params(likelihood, dispersion, extra_shape)
    for name, x in batches().items():
        ours, grads = log_prob_and_grads(decoder, x, params)
        decoder.lgamma_ratio_sum = lambda x, r, batch_cells: dense_lgamma_ratio_sum(x, r)
        dense, dense_grads = log_prob_and_grads(decoder, x, params)
        del decoder.lgamma_ratio_sum
        assert ours.shape == (B, *extra_shape)
        np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-4)
        assert len(grads) == len(dense_grads)
        for grad, dense_grad in zip(grads, dense_grads):
            np.testing.assert_allclose(grad, dense_grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("likelihood", ["negative_binomial", "zero_inflated_negative_binomial"])
@pytest.mark.parametrize("dispersion", ["cell", "gene"])
def test_decoder_log_prob_matches_scipy_on_sparse_counts(likelihood, dispersion, fused):
    decoder, params = decoder_and_params(likelihood, dispersion, (4,), seed=1)
    decoder.fused_lgamma = fused
    x = counts(0.1, seed=7)
    assert (x > 0).sum(-1).max() <= SPARSE_SHARE * G   # the sparse path is the one tested
    ours = decoder.log_prob(tf.constant(x), params).numpy()
    log_r = np.clip(params["log_r"].numpy(), -10, 10)
    nb = stats.nbinom.logpmf(x[:, None], np.exp(log_r), expit(-params["logits"].numpy()))
    if "zero" in likelihood:
        pi = expit(params["dropout_logits"].numpy())
        nb = np.where(x[:, None] == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log(1 - pi) + nb)
    np.testing.assert_allclose(ours, nb.sum(-1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("cells", [None, B])
def test_sparse_path_compiles_with_xla_for_any_batch_size(cells):
    """Keras traces a static batch size first, then retraces with an unknown one: the capacities
    must be XLA constants either way (per batch, then per cell)."""
    spec = [tf.TensorSpec([cells, G], tf.float32), tf.TensorSpec([cells, 2, G], tf.float32)]
    compiled = tf.function(lgamma_ratio_sum, input_signature=spec, jit_compile=True)
    for name in ("5%", "20%", "60% (dense path)", "one dense cell (dense path)"):
        x = batches()[name][: 5 if name == "5%" and cells is None else B]   # a smaller batch, as Keras's last
        r = tf.constant(np.exp(np.random.default_rng(8).normal(0.0, 1.0, (len(x), 2, G))).astype("float32"))
        np.testing.assert_allclose(compiled(x, r).numpy(), dense_lgamma_ratio_sum(x, r).numpy(), rtol=1e-5, atol=1e-4)


def test_rising_factorial_form_matches_scipy_values_and_gradients():
    """lgamma(x + r) - lgamma(r) and its r-gradient digamma(x + r) - digamma(r), in float64 by scipy,
    over counts on both sides of the multiplied-out factors and dispersions across LOG_R_RANGE."""
    from scipy.special import digamma, gammaln

    x = np.array([0, 1, 2, 3, RISING_TERMS, RISING_TERMS + 1, 7, 20, 173, 1000, 30000], "float64")
    r = np.exp(np.linspace(-10.0, 10.0, 9))
    xx, rr = np.meshgrid(x, r, indexing="ij")
    r_var = tf.Variable(rr.astype("float32"))
    with tf.GradientTape() as tape:
        ours = rising_lgamma_ratio(tf.constant(xx.astype("float32")), r_var)
        total = tf.reduce_sum(ours)
    grad = tape.gradient(total, r_var).numpy()
    expected = gammaln(xx + rr) - gammaln(rr)
    expected_grad = digamma(xx + rr) - digamma(rr)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert not ours.numpy()[0].any() and not grad[0].any()     # exactly 0 at x = 0, gradient too
    # the float32 lgamma difference it replaces loses digits at large r; this form does not
    dense = (tf.math.lgamma(tf.constant((xx + rr).astype("float32"))) - tf.math.lgamma(r_var)).numpy()
    relative_error = lambda value: np.abs(value - expected) / np.maximum(1.0, np.abs(expected))  # noqa: E731
    assert relative_error(ours.numpy()).max() < 1e-6 < relative_error(dense).max()


@pytest.mark.parametrize("xla", [False, True])
def test_compile_picks_the_fused_form_under_xla(xla):
    """Model.compile sets the decoder's form from the compilation, and training steps agree."""
    import keras

    from scvae_hier.data import CountBatches
    from scvae_hier.models import MixtureVAE

    x = tf.constant(counts(0.2, seed=9))
    model = MixtureVAE(G, n_components=3, latent_dim=2, hidden=(8,))
    model.build()
    model.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=xla)
    assert model.decoder.fused_lgamma is xla
    noise = tf.constant(np.random.default_rng(0).normal(size=(B, 3, 2)).astype("float32"))
    fused = model.terms(x, noise=noise)["elbo"].numpy()
    model.decoder.fused_lgamma = not xla
    np.testing.assert_allclose(model.terms(x, noise=noise)["elbo"].numpy(), fused, rtol=1e-5)
    model.decoder.fused_lgamma = xla
    history = model.fit(CountBatches(x.numpy(), batch_size=B), epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
