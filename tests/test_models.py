"""Model objectives against brute-force numpy computations, gradients, and save/load."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from scipy.special import expit, log_softmax

import keras
from scvae_hier.models import VAE, MixtureVAE, model_class

G, K, D, B = 7, 3, 2, 5


def softplus(v):
    return np.logaddexp(0.0, v)


def dense(layer, h):
    return h @ layer.kernel.numpy() + layer.bias.numpy()


def stack_forward(stack, h, category=None):
    """DenseStack without normalisation, in numpy; the first layer of a category-conditioned
    stack is written as scVAE writes it: a dense layer on [h, onehot(category)]."""
    for i, layer in enumerate(stack.dense):
        if i == 0 and category is not None:
            kernel = np.vstack([layer.kernel.numpy(), stack.category_bias.numpy()])
            onehot = np.zeros((h.shape[0], stack.n_categories))
            onehot[:, category] = 1.0
            h = np.concatenate([h, onehot], axis=1) @ kernel + layer.bias.numpy()
        else:
            h = dense(layer, h)
        h = np.maximum(h, 0.0)
    return h


def nb_log_likelihood(model, x, z):
    h = stack_forward(model.decoder.stack, z)
    log_r = np.clip(dense(model.decoder.heads["log_r"], h), -10, 10)
    logits = dense(model.decoder.heads["logits"], h)
    return stats.nbinom.logpmf(x, np.exp(log_r), expit(-logits)).sum(-1)


def tiny_counts():
    return np.random.default_rng(1).poisson(3.0, size=(B, G)).astype("float32")


@pytest.mark.parametrize("law", ["normal", "student-t"])
def test_mixture_elbo_matches_brute_force_loop_over_y(law):
    model = MixtureVAE(G, n_components=K, latent_dim=D, hidden=(6, 5), prior=law, normalisation="none",
                       prior_probabilities="learnable", input_transform="log1p")
    model.build()
    model.prior_logits.assign(np.array([0.3, -0.2, 0.1], dtype="float32"))
    x = tiny_counts()
    noise = np.random.default_rng(2).normal(size=(B, K, D)).astype("float32")
    terms = {k: v.numpy() for k, v in model.terms(tf.constant(x), noise=tf.constant(noise)).items()}

    h = np.log1p(x)
    log_qy = log_softmax(dense(model.y_logits, stack_forward(model.y_stack, h)), axis=1)
    log_py = log_softmax(model.prior_logits.numpy())
    prior_loc = model.prior_components.loc.numpy()
    prior_scale = softplus(model.prior_components.raw_scale.numpy()) + 1e-4
    elbo = np.zeros(B)
    for k in range(K):  # the brute-force loop over y, one decoder pass each
        hk = stack_forward(model.z_stack, h, category=k)
        loc = dense(model.z_head.loc, hk)
        scale = softplus(dense(model.z_head.raw_scale, hk)) + 1e-4
        z = loc + scale * noise[:, k]
        reconstruction = nb_log_likelihood(model, x, z)
        if law == "normal":
            kl_z = (np.log(prior_scale[k] / scale) + (scale ** 2 + (loc - prior_loc[k]) ** 2)
                    / (2 * prior_scale[k] ** 2) - 0.5).sum(-1)
        else:
            df = 1.0 + softplus(model.prior_components.raw_df.numpy()[k])
            kl_z = (stats.norm.logpdf(z, loc, scale).sum(-1)
                    - stats.t.logpdf(z, df, prior_loc[k], prior_scale[k]).sum(-1))
        elbo += np.exp(log_qy[:, k]) * (reconstruction - kl_z)
    kl_y = (np.exp(log_qy) * (log_qy - log_py)).sum(-1)
    elbo -= kl_y
    np.testing.assert_allclose(terms["elbo"], elbo, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(terms["kl_y"], kl_y, rtol=1e-4, atol=1e-5)
    # With the KL weight at 1 the training loss is the negative ELBO; at 0 it is -reconstruction.
    np.testing.assert_allclose(terms["loss"], -elbo, rtol=1e-4, atol=1e-3)
    model.kl_weight.assign(0.0)
    terms0 = model.terms(tf.constant(x), noise=tf.constant(noise))
    np.testing.assert_allclose(terms0["loss"].numpy(), -terms0["reconstruction"].numpy(), rtol=1e-5)


def test_vae_elbo_matches_hand_computation():
    model = VAE(G, latent_dim=D, hidden=(6,), normalisation="none", input_transform="log1p")
    model.build()
    x = tiny_counts()
    noise = np.random.default_rng(3).normal(size=(B, D)).astype("float32")
    terms = model.terms(tf.constant(x), noise=tf.constant(noise))
    h = stack_forward(model.z_stack, np.log1p(x))
    loc, scale = dense(model.z_head.loc, h), softplus(dense(model.z_head.raw_scale, h)) + 1e-4
    kl = 0.5 * (scale ** 2 + loc ** 2 - 1.0 - 2.0 * np.log(scale)).sum(-1)
    expected = nb_log_likelihood(model, x, loc + scale * noise) - kl
    np.testing.assert_allclose(terms["elbo"].numpy(), expected, rtol=1e-4, atol=1e-3)


def test_mixture_outputs_are_posterior_weighted_latent_means():
    model = MixtureVAE(G, n_components=K, latent_dim=D, hidden=(6,))
    model.build()
    x = tf.constant(tiny_counts())
    log_qy, loc, _ = model.encode(x)
    out = model(x)
    np.testing.assert_allclose(out["cluster_probabilities"].numpy().sum(1), 1.0, rtol=1e-6)
    expected = (np.exp(log_qy.numpy())[..., None] * loc.numpy()).sum(1)
    np.testing.assert_allclose(out["latent"].numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("law", ["normal", "student-t"])
def test_gradients_reach_every_trainable_weight(law):
    model = MixtureVAE(G, n_components=K, latent_dim=D, hidden=(6,), prior=law, prior_probabilities="learnable")
    model.build()
    x = tf.constant(tiny_counts())
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model.terms(x, training=True)["loss"])
    grads = tape.gradient(loss, model.trainable_variables)
    names = [v.path for v in model.trainable_variables]
    assert any("raw_df" in n for n in names) == (law == "student-t")
    assert any("prior_logits" in n for n in names)
    for name, grad in zip(names, grads):
        assert grad is not None, f"no gradient reaches {name}"
        assert np.any(grad.numpy() != 0), f"zero gradient for {name}"


def test_uniform_prior_probabilities_stay_fixed():
    model = MixtureVAE(G, n_components=K, latent_dim=D, hidden=(6,))
    model.build()
    assert not any("prior_logits" in v.path for v in model.trainable_variables)


@pytest.mark.parametrize("make", [
    lambda: VAE(G, latent_dim=D, hidden=(6,)),
    lambda: MixtureVAE(G, n_components=K, latent_dim=D, hidden=(6, 4), prior="student-t",
                       likelihood="zero_inflated_negative_binomial"),
    lambda: MixtureVAE(G, n_components=K, latent_dim=D, hidden=(6,), likelihood="poisson", normalisation="layer"),
])
def test_save_and_load_reproduce_outputs_exactly(tmp_path, make):
    model = make()
    model.build()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    x = np.random.default_rng(4).poisson(2.0, size=(40, G)).astype("float32")
    model.fit(x, batch_size=8, epochs=1, verbose=0)  # move batch-norm statistics off their defaults
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    before, after = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_model_names():
    assert model_class("mixture") is MixtureVAE and model_class("vae") is VAE
    with pytest.raises(ValueError, match="Unknown model 'gmm'"):
        model_class("gmm")


def test_bad_model_settings_are_clear_errors():
    with pytest.raises(ValueError, match="at least 2 components"):
        MixtureVAE(G, n_components=1)
    with pytest.raises(ValueError, match="Unknown prior 'cauchy'"):
        MixtureVAE(G, prior="cauchy")
    with pytest.raises(ValueError, match="Unknown normalisation"):
        VAE(G, normalisation="group")


def test_training_noise_is_the_default_generator_stream_without_xla():
    """The noise is drawn by Philox by name (fast under XLA); without XLA that is the very
    stream TensorFlow's default "auto_select" gives, so runs trained before the change (all
    without XLA) keep their noise, and successive draws move on along the stream."""
    model = MixtureVAE(G, n_components=K, latent_dim=D, hidden=(6,), seed=7)
    model.build()
    start = int(model.noise_draws.numpy())
    first, second = model.sample_noise(tf.constant([B, K, D])), model.sample_noise(tf.constant([B, K, D]))
    for draw, noise in enumerate([first, second], start):
        expected = tf.random.stateless_normal([B, K, D], seed=tf.constant([7, draw], tf.int32))  # auto_select
        np.testing.assert_array_equal(noise.numpy(), expected.numpy())
    assert not np.array_equal(first.numpy(), second.numpy())
