"""IWAE and ELBO evaluation: bound ordering, convergence to a brute-force log p(x), gene checks."""
import keras
import numpy as np
import pytest
import scipy.sparse as sp
import tensorflow as tf

from scvae_hier.distributions import mixture_prior
from scvae_hier.bounds import check_genes, elbo_terms, iwae
from scvae_hier.models import VAE, IndMoMVAE, MixtureVAE, MoMixVAE

G = 6
MODELS = {
    "vae": lambda: VAE(G, latent_dim=2, hidden=(5,)),
    "mixture": lambda: MixtureVAE(G, n_components=3, latent_dim=2, hidden=(5,)),
    "indmom": lambda: IndMoMVAE(G, level_sizes=(2, 3), latent_dim=2, hidden=(5,)),
    "momix-exact": lambda: MoMixVAE(G, level_sizes=(2, 3), latent_dim=2, hidden=(5,), inference="exact"),
    "momix-scalable-t": lambda: MoMixVAE(G, level_sizes=(2, 3), latent_dim=2, hidden=(5,), prior="student-t"),
}


def counts(n, genes=G, rate=2.0, seed=0):
    return np.random.default_rng(seed).poisson(rate, (n, genes)).astype("float32")


def built(name):
    keras.utils.set_random_seed(1)
    model = MODELS[name]()
    model.build()
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_iwae_bounds_the_elbo_and_tightens_with_samples(name):
    model = built(name)
    X = counts(64)
    draws = int(model.noise_draws.numpy())
    elbo = elbo_terms(model, X, batch_size=32)["elbo"].mean()
    bounds = [iwae(model, X, n_samples=s, batch_size=32).mean() for s in (1, 10, 100)]
    assert int(model.noise_draws.numpy()) == draws  # evaluation leaves the training noise alone
    assert iwae(model, X, n_samples=50, batch_size=32).mean() >= elbo
    assert bounds[0] <= bounds[1] + 0.05 and bounds[1] <= bounds[2] + 0.05, bounds


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_sample_iwae_matches_the_elbo_in_expectation(name):
    """One sample: E log w is the ELBO for the VAE; with y summed out of q(z|x) and p(z) it is
    the z-marginal ELBO, which is >= the reported joint (y, z) ELBO by E KL(q(y|x,z) || p(y|z))
    (for IndMoMVAE, log of the branch-mean weight: >= the mean of branch ELBOs)."""
    model = built(name)
    X = np.repeat(counts(2), 1500, axis=0)
    one = iwae(model, X, n_samples=1, batch_size=500, seed=3)
    elbo = elbo_terms(model, X, batch_size=500)["elbo"]
    tolerance = 4 * np.sqrt(one.var() / len(one) + elbo.var() / len(elbo)) + 1e-3
    if name == "vae":
        assert abs(one.mean() - elbo.mean()) < tolerance
    else:
        assert one.mean() > elbo.mean() - tolerance


def brute_force_log_px(model, X, grid, prior=None):
    """log ∫ p(x|z) p(z) dz on a fine grid over a 1-D latent, p(x|z) from the model's decoder."""
    z = tf.constant(grid[:, None], tf.float32)
    params = {k: tf.cast(v, tf.float64)[None] for k, v in model.decoder(z).items()}  # [1, N, G]
    log_px_z = model.decoder.log_prob(tf.constant(X, tf.float64), params).numpy()     # [C, N]
    log_pz = (prior or model.prior()).log_prob(z).numpy().astype(np.float64)                     # [N]
    log_integrand = log_px_z + log_pz
    return np.logaddexp.reduce(log_integrand, axis=1) + np.log(grid[1] - grid[0])


def set_broad_proposal(model, locs, stack=None, head=None):
    """q(z|x,y) = N(locs[y], 1) whatever x: a random encoder can put q far off the posterior,
    where no practical S closes the gap; a broad proposal lets the bound converge in the test."""
    stack, head = stack or model.z_stack, head or model.z_head
    stack.dense[0].kernel.assign(np.zeros(stack.dense[0].kernel.shape, "float32"))
    stack.dense[0].bias.assign(np.zeros(stack.dense[0].bias.shape, "float32"))
    if stack.n_categories:
        stack.category_bias.assign(np.eye(*stack.category_bias.shape, dtype="float32"))  # h = onehot(y)
    head.loc.kernel.assign(np.asarray(locs, "float32").reshape(head.loc.kernel.shape))
    head.loc.bias.assign(np.zeros(1, "float32") + (0.5 if not stack.n_categories else 0.0))
    head.raw_scale.kernel.assign(np.zeros(head.raw_scale.kernel.shape, "float32"))
    head.raw_scale.bias.assign(np.full(1, np.log(np.expm1(1.0)), "float32"))


@pytest.mark.parametrize("name", ["vae", "mixture", "indmom", "momix-exact", "momix-scalable"])
def test_iwae_approaches_brute_force_log_likelihood(name):
    keras.utils.set_random_seed(2)
    kwargs = dict(latent_dim=1, hidden=(3,), likelihood="poisson", normalisation="none")
    if name == "vae":
        model = VAE(4, **kwargs)
        model.build()
        set_broad_proposal(model, np.zeros(3))
    elif name.startswith("momix"):
        inference = name.split("-")[1]
        n_z = 4 if inference == "exact" else 2
        model = MoMixVAE(4, level_sizes=(2, 2), inference=inference, **{**kwargs, "hidden": (n_z,)})
        model.build()
        set_broad_proposal(model, np.linspace(-2.0, 2.0, n_z))
    elif name == "indmom":
        model = IndMoMVAE(4, level_sizes=(2, 3), **kwargs)
        model.build()
        for stack, head in zip(model.z_stacks, model.z_heads):
            set_broad_proposal(model, [-1.5, 1.0, 0.0], stack, head)
    else:
        model = MixtureVAE(4, n_components=3, **kwargs)
        model.build()
        means = np.array([[-2.0], [0.0], [2.5]])
        model.initialise_prior({3: (means, np.array([[0.5], [0.7], [0.4]]), None)})
        set_broad_proposal(model, means)
    X = counts(5, genes=4, rate=3.0, seed=1)
    grid = np.linspace(-12.0, 12.0, 48001)
    if name == "indmom":  # p(x) = mean over branches of p_b(x)
        branches = [brute_force_log_px(model, X, grid, mixture_prior(logits, prior.distribution()))
                    for logits, prior in zip(model.prior_logits, model.priors)]
        exact = np.logaddexp.reduce(branches, axis=0) - np.log(len(branches))
    else:
        exact = brute_force_log_px(model, X, grid)
    estimate = iwae(model, X, n_samples=20000, batch_size=5)
    assert np.all(np.abs(estimate - exact) < 0.05), (estimate, exact)
    # Averaging log-weights instead of log-mean-exp gives the (marginal) ELBO: well below log p(x).
    averaged = iwae(model, np.repeat(X, 400, axis=0), n_samples=1, batch_size=500).reshape(5, 400).mean(axis=1)
    assert np.all(averaged < exact - 0.1), (averaged, exact)


def test_iwae_is_reproducible_and_batches_like_the_dense_matrix():
    model = built("mixture")
    X = counts(40)
    first = iwae(model, X, n_samples=20, batch_size=16, seed=7)
    np.testing.assert_array_equal(first, iwae(model, X, n_samples=20, batch_size=16, seed=7))
    np.testing.assert_allclose(first, iwae(model, sp.csr_matrix(X), n_samples=20, batch_size=16, seed=7), rtol=1e-6)
    assert not np.allclose(first, iwae(model, X, n_samples=20, batch_size=16, seed=8))


def test_elbo_terms_restore_the_kl_weight_and_report_every_term():
    model = built("momix-exact")
    model.kl_weight.assign(0.25)
    terms = elbo_terms(model, counts(30), batch_size=16)
    assert float(model.kl_weight.numpy()) == 0.25
    assert set(terms) == set(model.term_names)
    assert all(v.shape == (30,) for v in terms.values())
    np.testing.assert_allclose(terms["elbo"], terms["reconstruction"] - terms["kl_z"] - terms["kl_y"], rtol=1e-5)


def test_check_genes_names_missing_and_extra_genes():
    check_genes(["a", "b", "c"], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"missing from the data: c.*unknown to the model: d"):
        check_genes(["a", "b", "c"], ["a", "b", "d"])
    with pytest.raises(ValueError, match="different order"):
        check_genes(["a", "b"], ["b", "a"])


def test_batch_level_terms_do_not_depend_on_cells_being_stored_by_type():
    """Files store cells grouped by type; batching them in file order would put one type in each
    batch and report about one component in use. elbo_terms batches a fixed shuffle instead, and
    its per-cell terms still come back in the caller's order."""
    keras.utils.set_random_seed(5)  # a draw whose q(y|x) tells the two types apart
    model = MixtureVAE(G, n_components=3, latent_dim=2, hidden=(5,))
    model.build()
    kernel = model.y_logits.kernel
    kernel.assign(kernel * 200.0)  # near one-hot q(y|x), driven by the input
    rng = np.random.default_rng(0)
    group_a = rng.poisson([20, 20, 20, 0.2, 0.2, 0.2], (64, G))
    group_b = rng.poisson([0.2, 0.2, 0.2, 20, 20, 20], (64, G))
    X = np.vstack([group_a, group_b]).astype("float32")
    q = np.exp(model.encode(tf.constant(X))[0].numpy())

    def perplexity(p):
        mean = p.mean(axis=0)
        return float(np.exp(-(mean * np.log(mean + 1e-12)).sum()))

    whole, per_group = perplexity(q), max(perplexity(q[:64]), perplexity(q[64:]))
    assert whole > per_group + 0.3  # the two types use different components (else the test proves nothing)
    terms = elbo_terms(model, X, batch_size=64)
    assert abs(terms["components_used"].mean() - whole) < 0.25 * (whole - per_group)
    shuffled = rng.permutation(len(X))
    again = elbo_terms(model, X[shuffled], batch_size=64)
    np.testing.assert_allclose(again["kl_y"], terms["kl_y"][shuffled], rtol=1e-5)  # analytic, per cell
