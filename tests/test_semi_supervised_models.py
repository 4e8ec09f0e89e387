"""Partial labels for MixtureVAE, IndMoMVAE and MoMixVAE (issue 16's "every hierarchical model"):
the label masks against brute force over classes and paths, each model's semi-supervised terms
against a computation by hand, and the API end to end (given labels kept, names that nest, a
saved model that reloads with the same names), plus the refusals."""
import itertools

import anndata
import numpy as np
import pytest
import tensorflow as tf
from conftest import FAST
from scipy.special import logsumexp
from test_partial_labels import _partial_adata
from test_tree import SMALL_PARENTS

from scvae_hier.labels import allowed_components
from scvae_hier.models.indmom import IndMoMVAE
from scvae_hier.models.mixture import MixtureVAE
from scvae_hier.models.momix import MoMixVAE
from scvae_hier.models.supervision import level_masks, most_probable_path
from scvae_hier.tree_shape import leaf_ancestors

SIZES = (2, 3, 5)
LEAVES = leaf_ancestors(SMALL_PARENTS, 5)          # [3, 5]: the class of every leaf at every level
LABELS = np.array([[-1, -1, -1], [0, -1, -1], [1, 2, -1], [0, 1, 1], [1, 2, 4]])  # none / coarse / mid / leaf x2
SMALL = dict(latent_dim=2, hidden=(6, 5), normalisation="none", input_transform="log1p")


def _allowed_by_hand(row, level, k):
    """Class k of `level` is allowed when some leaf under it agrees with every label of the row."""
    return any(LEAVES[level][m] == k and all(row[l] < 0 or LEAVES[l][m] == row[l] for l in range(3))
               for m in range(5))


def test_level_masks_match_brute_force_over_leaves():
    masks = [m.numpy() == 0 for m in level_masks(tf.constant(LABELS), SMALL_PARENTS, SIZES)]
    for i, row in enumerate(LABELS):
        for level, k_l in enumerate(SIZES):
            for k in range(k_l):
                assert masks[level][i, k] == _allowed_by_hand(row, level, k), (row, level, k)


def test_momix_path_mask_allows_exactly_the_paths_that_agree_with_the_labels():
    """Brute force over all 2 x 3 x 5 paths, tree paths or not: a path is allowed when every level's
    class is its label where labelled, and under the labels of the coarser levels."""
    model = MoMixVAE(7, level_sizes=SIZES, parents=SMALL_PARENTS, semi_supervised=True, **SMALL)
    mask = model.path_label_mask(tf.constant(LABELS)).numpy() > -1.0        # [5, 2, 3, 5]
    parent_1, parent_2 = np.asarray(SMALL_PARENTS[0]), np.asarray(SMALL_PARENTS[1])
    for i, row in enumerate(LABELS):
        for path in itertools.product(*(range(k) for k in SIZES)):
            y1, y2, y3 = path
            ok = True
            if row[0] >= 0:
                ok &= y1 == row[0] and parent_1[y2] == row[0] and parent_1[parent_2[y3]] == row[0]
            if row[1] >= 0:
                ok &= y2 == row[1] and parent_2[y3] == row[1]
            if row[2] >= 0:
                ok &= y3 == row[2]
            assert mask[(i, *path)] == ok, (row, path)
    # Coarse label 0: 2 level-2 classes x 3 leaves under it, off-tree pairs included (leaf 1 is not under class 0).
    assert mask[1].sum() == 6 and mask[1][0, 0, 1]


def _pair(cls, **kwargs):
    """A semi-supervised model and the same model without labels, with the same weights."""
    extra = dict(parents=SMALL_PARENTS) if cls is not MixtureVAE else dict(class_sizes=SIZES, parents=SMALL_PARENTS)
    sizes = dict(n_components=5) if cls is MixtureVAE else dict(level_sizes=SIZES)
    semi = cls(7, semi_supervised=True, label_weight=2.0, **sizes, **extra, **SMALL, **kwargs)
    plain = cls(7, **sizes, **SMALL, **kwargs)
    semi.build(), plain.build()
    assert len(semi.get_weights()) == len(plain.get_weights()) + 1           # + the classification weight
    plain.set_weights([w for v, w in zip(semi.weights, semi.get_weights()) if "classification" not in v.path])
    return semi, plain


def _batch(model, seed=1):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.poisson(3.0, size=(5, 7)).astype("float32"))
    n_draws = {MixtureVAE: 5, IndMoMVAE: sum(SIZES), MoMixVAE: 5}[type(model)]
    noise = tf.constant(rng.normal(size=(5, n_draws, 2)).astype("float32"))
    return x, noise


@pytest.mark.parametrize("cls", [MixtureVAE, IndMoMVAE, MoMixVAE])
def test_semi_supervised_terms_by_hand(cls):
    """An unlabelled cell's terms are the model's without labels; a labelled cell's classification
    term is -log of its unrestricted posterior over the allowed classes or paths; a cell labelled
    at the leaf has one allowed path, so its KL over y is -log p(that path); the loss adds
    classification_weight x classification."""
    semi, plain = _pair(cls)
    x, noise = _batch(semi)
    labels = tf.constant(LABELS)
    terms = {k: v.numpy() for k, v in semi.terms(x, noise=noise, labels=labels).items()}
    free = {k: v.numpy() for k, v in plain.terms(x, noise=noise).items()}
    np.testing.assert_allclose(terms["elbo"][0], free["elbo"][0], rtol=1e-5)
    assert terms["classification"][0] == pytest.approx(0.0, abs=1e-6)
    h = semi.encoder_input(x, None)
    if cls is MixtureVAE:
        log_q = semi.encode(x)[0].numpy()                                            # [5, 5] leaves
        allowed = allowed_components(LABELS, LEAVES)
        expected = -logsumexp(np.where(allowed, log_q, -np.inf), axis=1)
        log_p_leaf = tf.nn.log_softmax(semi.prior_logits).numpy()
        kl_leaf = -log_p_leaf[LABELS[4, 2]]
    elif cls is IndMoMVAE:
        expected = np.zeros(5)
        for level, (log_qy, _, _) in enumerate(semi.encode(x)):
            allowed = np.array([[_allowed_by_hand(row, level, k) for k in range(SIZES[level])] for row in LABELS])
            expected -= logsumexp(np.where(allowed, log_qy.numpy(), -np.inf), axis=1)
        # branch mean of -log p_l(label_l): each branch's q is one-hot on the label
        kl_leaf = np.mean([-tf.nn.log_softmax(semi.prior_logits[l]).numpy()[LABELS[4, l]] for l in range(3)])
    else:
        log_q = semi.log_q_paths(h).numpy().reshape(5, -1)
        paths = np.array(list(itertools.product(*(range(k) for k in SIZES))))      # [30, 3] in C order
        allowed = np.array([[all(r < 0 or _agrees(r, path, l) for l, r in enumerate(row)) for path in paths]
                            for row in LABELS])
        expected = -logsumexp(np.where(allowed, log_q, -np.inf), axis=1)
        kl_leaf = -semi.log_prior_paths().numpy()[tuple(LEAVES[:, LABELS[4, 2]])]
    np.testing.assert_allclose(terms["classification"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(terms["kl_y"][4], kl_leaf, rtol=1e-4, atol=1e-4)
    assert (terms["classification"][1:] > 0).all()
    unlabelled_loss = semi.terms(x, noise=noise, labels=tf.fill((5, 3), -1))["loss"].numpy()
    np.testing.assert_allclose(unlabelled_loss, free["loss"], rtol=1e-5, atol=1e-4)
    # The loss adds classification_weight (label_weight until fit sets it from the labels) x classification.
    assert semi.classification_weight.numpy() == pytest.approx(2.0)
    semi.classification_weight.assign(0.0)
    unweighted = semi.terms(x, noise=noise, labels=labels)["loss"].numpy()
    np.testing.assert_allclose(terms["loss"], unweighted + 2.0 * terms["classification"], rtol=1e-5, atol=1e-4)


def _agrees(label, path, level):
    """Whether a path of the full product (tree path or not) agrees with a label at `level`: its
    class there is the label, and each finer class of the path lies under the label."""
    if path[level] != label:
        return False
    for finer in range(level + 1, len(path)):
        node = path[finer]
        for up in range(finer, level, -1):
            node = SMALL_PARENTS[up - 1][node]
        if node != label:
            return False
    return True


def test_most_probable_path_is_the_best_tree_path_by_brute_force():
    rng = np.random.default_rng(2)
    probabilities = [rng.dirichlet(np.ones(k), size=40) for k in SIZES]
    leaf, depth = rng.integers(0, 5, 40), rng.integers(0, 4, 40)        # labelled down to `depth` levels
    labels = np.where(np.arange(3)[None] < depth[:, None], LEAVES[:, leaf].T, -1)
    predicted = np.stack(most_probable_path(probabilities, SMALL_PARENTS, labels), axis=1)
    allowed = allowed_components(labels, LEAVES)
    for i in range(40):
        scores = {m: sum(np.log(probabilities[l][i, LEAVES[l][m]]) for l in range(3)) for m in range(5) if allowed[i, m]}
        best = max(scores, key=scores.get)
        np.testing.assert_array_equal(predicted[i], LEAVES[:, best])


@pytest.mark.parametrize("model_name", ["MixtureVAE", "IndMoMVAE", "MoMixVAE"])
def test_api_semi_supervised_models_keep_labels_nest_and_reload(model_name, pbmc_slice, tmp_path):
    import scvae_hier as sh

    adata = _partial_adata(pbmc_slice)
    levels = ["level_1", "level_2", "level_3", "level_4"]
    cls = getattr(sh, model_name)
    cls.setup_anndata(adata, levels=levels)
    model = cls(adata, semi_supervised=True, n_genes=80, latent_dim=4, hidden=(16, 16), xla=False)
    assert model.module.semi_supervised and model.module.clustering == "levels"
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    assert "classification" in model.history.columns and model.history["classification"].iloc[-1] > 0
    table = model.predict_levels()
    truth = anndata.read_h5ad(pbmc_slice).obs
    paths = {tuple(p) for p in model.hierarchy.paths.values()}
    predicted = table[[f"scvae_{level}" for level in levels]].astype(str).to_numpy()
    assert all(tuple(p) in paths for p in predicted)
    for level in levels:
        given = adata.obs[level].notna().to_numpy()
        np.testing.assert_array_equal(table[f"scvae_{level}"].astype(str)[given], truth[level].astype(str)[given])
    model.save(tmp_path / "model")
    loaded = cls.load(tmp_path / "model", adata=anndata.read_h5ad(pbmc_slice))
    assert loaded.module.semi_supervised and loaded.module.parents == model.module.parents
    own = model.predict_levels(anndata.read_h5ad(pbmc_slice), keep_labels=False)
    again = loaded.predict_levels(anndata.read_h5ad(pbmc_slice), keep_labels=False)
    np.testing.assert_array_equal(own["scvae_level_4"].astype(str), again["scvae_level_4"].astype(str))


def test_mixture_extra_components_are_unassigned_and_refusals(pbmc_slice, tmp_path, capsys):
    model = MixtureVAE(7, n_components=7, semi_supervised=True, class_sizes=SIZES, parents=SMALL_PARENTS, **SMALL)
    assert model.level_sizes == (3, 4, 7)
    allowed = allowed_components(np.array([[0, -1, -1], [-1, -1, -1]]), model.component_ancestors)
    assert not allowed[0, 5:].any() and allowed[1].all()        # a labelled cell never uses the extras
    with pytest.raises(ValueError, match="at least 5"):
        MixtureVAE(7, n_components=4, semi_supervised=True, class_sizes=SIZES, parents=SMALL_PARENTS, **SMALL)
    from scvae_hier.cli import main
    common = ["train", str(pbmc_slice), *FAST, "--epochs", "1", "--output", str(tmp_path / "bad"), "--labelled",
              "level_4=0.1"]
    for flags, message in ((["--model", "vae"], "plain vae has none"),
                           (["--model", "mixture", "--novel-classes", "1"], "--novel-classes is a TreeVAE option"),
                           (["--model", "indmom", "--level-sizes", "2", "4", "6", "12"], "leave out --level-sizes")):
        assert main([*common, *flags]) == 2
        assert message in capsys.readouterr().err
