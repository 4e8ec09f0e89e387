"""Novelty (scvae_hier.novelty): the quantile read-out against a count by hand, TreeVAE's ELBO per
count against the ELBO computed from its terms, the thinning that brings deeper cells to the
training depth, and on real cells a type left out of the reference scored as novel and called `unassigned`
through the API and the CLI, while the posterior rule does not find it; deeper cells thinned,
shallower ones warned of."""
import anndata
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

import scvae_hier as sh
from scvae_hier.cli import main
from scvae_hier.data import prepare
from scvae_hier.novelty import MIN_CELLS, QUANTILES, NoveltyDepthWarning, novelty, novelty_reference

LEVELS = ["level_1", "level_2", "level_3", "level_4"]


def test_novelty_is_the_share_of_the_components_training_cells_explained_better():
    rng = np.random.default_rng(0)
    components = np.repeat([0, 1, 2], [400, 300, MIN_CELLS - 1])
    elbo = np.concatenate([rng.normal(-2.0, 0.2, 400), rng.normal(-5.0, 1.0, 300), rng.normal(-1.0, 0.1, MIN_CELLS - 1)])
    reference = novelty_reference(elbo, components, 3, counts=np.full(len(elbo), 100.0))
    assert len(reference["quantiles"]) == 3 and len(reference["quantiles"][0]) == len(QUANTILES)
    new_elbo = np.array([-2.0, -2.3, -1.0, -9.0, -4.0, -7.0, -1.0, -3.0])
    new_components = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    got = novelty(new_elbo, new_components, reference)
    for value, component, score in zip(got, new_components, new_elbo):
        # by hand: the share of the component's training cells with a higher ELBO per count;
        # a component under MIN_CELLS cells is read against every training cell
        pool = elbo[components == component] if component < 2 else elbo
        assert value == pytest.approx(np.mean(pool > score), abs=0.01)
    assert got[3] == 1.0 and got[2] == 0.0   # beyond every training cell, and better than all of them
    # a component's own training cells read back about uniform
    own = novelty(elbo[:400], components[:400], reference)
    assert np.quantile(own, [0.25, 0.5, 0.75]) == pytest.approx([0.25, 0.5, 0.75], abs=0.02)


@pytest.fixture(scope="module")
def left_out_type(pbmc):
    """A semi-supervised TreeVAE trained on 150 cells of each of nine populations of one study
    (fastTopics), never a CD14+ monocyte; the query: 40 other cells of each of those nine and 100
    CD14+ monocytes, from another study (scMINER), as a user's new file would be."""
    rng = np.random.default_rng(0)
    label = pbmc.obs["source_library"].astype(str).to_numpy()
    study = pbmc.obs["source_dataset"].astype(str).to_numpy()
    reference_rows, query_rows = [], []
    for name in np.unique(label):
        if name != "cd14_monocytes":
            reference_rows += list(rng.choice(np.flatnonzero((label == name) & (study == "fastTopics")), 150, replace=False))
        others = np.flatnonzero((label == name) & (study != "fastTopics"))
        query_rows += list(rng.choice(others if len(others) else np.flatnonzero((label == name) & (study == "fastTopics")),
                                      100 if name == "cd14_monocytes" else 40, replace=False))
    reference = pbmc[np.sort(reference_rows)].copy()
    query = pbmc[np.sort(np.setdiff1d(query_rows, reference_rows))].copy()
    sh.TreeVAE.setup_anndata(reference, levels=LEVELS)
    model = sh.TreeVAE(reference, semi_supervised=True, n_genes=200, latent_dim=8, hidden=(64, 64), xla=False, seed=0)
    model.train(max_epochs=30, batch_size=64, progress_bar=False)
    return model, reference, query


def test_elbo_per_count_is_the_elbo_at_the_latent_mean_over_the_counts(left_out_type):
    model, _, query = left_out_type
    module = model.module
    prepared = prepare(query, genes=module.metadata["genes"])
    x = tf.constant(prepared.X.toarray(), tf.float32)
    out = module.outputs(x)
    loc = module.encode(x)[1]
    elbo = module.terms(x, noise=tf.zeros_like(loc))["elbo"].numpy()
    np.testing.assert_allclose(out["elbo_per_count"].numpy(), elbo / prepared.X.toarray().sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(out["component"].numpy(), module.encode(x)[0].numpy().argmax(axis=1))


def test_a_type_the_reference_lacked_is_novel_and_the_posterior_does_not_say_so(left_out_type, tmp_path, capsys):
    model, reference, query = left_out_type
    novel = (query.obs["source_library"] == "cd14_monocytes").to_numpy()
    table = model.predict_levels(query)
    assert roc_auc_score(novel, table["scvae_novelty"]) > 0.85
    assert roc_auc_score(novel, -table["scvae_level_4_probability"]) < 0.8   # the posterior is sure of them
    # known types of another study stay well below the left-out type; the reference's own cells read uniform
    assert np.median(table["scvae_novelty"][~novel]) < 0.8 < np.median(table["scvae_novelty"][novel])
    own = model.predict_levels(reference, keep_labels=False)["scvae_novelty"]
    assert np.quantile(own, [0.25, 0.75]) == pytest.approx([0.25, 0.75], abs=0.05)

    called = model.predict_levels(query, novelty_cutoff=0.99)
    unassigned = (called[[f"scvae_{level}" for level in LEVELS]] == "unassigned").to_numpy()
    assert (unassigned.all(axis=1) == unassigned.any(axis=1)).all()   # at every level or at none
    assert unassigned[novel, 0].mean() > 0.6 and unassigned[~novel, 0].mean() < 0.15
    same = ~unassigned[:, 0]
    for level in LEVELS:   # the other cells keep their names
        np.testing.assert_array_equal(called[f"scvae_{level}"][same].astype(str), table[f"scvae_{level}"][same].astype(str))
    # the reference's own labelled cells keep their labels whatever their novelty
    kept = model.predict_levels(novelty_cutoff=0.0)
    assert not (kept["scvae_level_4"] == "unassigned").any()

    # the CLI: a saved model annotates a file with the same names and novelty
    model.save(tmp_path / "model")
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["annotate", str(tmp_path / "model"), str(tmp_path / "query.h5ad"), "--output",
                 str(tmp_path / "annotated.h5ad"), "--novelty-cutoff", "0.99"]) == 0
    annotated = anndata.read_h5ad(tmp_path / "annotated.h5ad")
    np.testing.assert_allclose(annotated.obs["scvae_novelty"], called["scvae_novelty"], atol=1e-4)  # float32 saved
    np.testing.assert_array_equal(annotated.obs["scvae_level_4"].astype(str), called["scvae_level_4"].astype(str))
    assert annotated.uns["scvae_annotation"]["novelty_cutoff"] == 0.99
    printed = capsys.readouterr().out
    assert f"above --novelty-cutoff 0.99: {int((called['scvae_novelty'] > 0.99).sum())}, called unassigned" in printed


def test_novelty_cutoff_refusals_say_why(left_out_type, pbmc_slice):
    model, _, query = left_out_type
    with pytest.raises(ValueError, match="novelty_cutoff must be a share in"):
        model.predict_levels(query, novelty_cutoff=1.5)
    saved = model.module.metadata.pop("novelty_reference")
    try:
        assert "scvae_novelty" not in model.predict_levels(query)
        with pytest.raises(ValueError, match="saved before novelty existed.*scvae-hier refit"):
            model.predict_levels(query, novelty_cutoff=0.99)
    finally:
        model.module.metadata["novelty_reference"] = saved
    adata = anndata.read_h5ad(pbmc_slice)
    sh.MixtureVAE.setup_anndata(adata, levels=LEVELS)
    mixture = sh.MixtureVAE(adata, n_genes=200, latent_dim=2, hidden=(8,), xla=False, drop_empty_cells=True)
    mixture.train(max_epochs=1, progress_bar=False)
    assert "scvae_novelty" not in mixture.predict_levels()
    with pytest.raises(ValueError, match="needs TreeVAE.*not MixtureVAE"):
        mixture.predict_levels(novelty_cutoff=0.99)


def test_deeper_cells_are_scored_at_the_training_depth_and_much_shallower_ones_warned_of(left_out_type):
    import warnings
    model, reference, _ = left_out_type
    deeper = reference.copy()
    deeper.X = deeper.X * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoveltyDepthWarning)
        plain = model.predict_levels(reference, keep_labels=False)   # the training depth: no warning
        scaled = model.predict_levels(deeper)                         # thinned back: no warning either
    # three times the reads, thinned to a third, read about as the cells themselves; unthinned they
    # would all read typical
    assert abs(np.median(scaled["scvae_novelty"]) - np.median(plain["scvae_novelty"])) < 0.15
    module = model.module
    unthinned = novelty(*(np.asarray(module.outputs(prepare(deeper, genes=module.metadata["genes"]).X.toarray())[key])
                          for key in ("elbo_per_count", "component")), module.metadata["novelty_reference"])
    assert np.median(unthinned) < np.median(plain["scvae_novelty"]) - 0.2
    thinned = np.random.default_rng(0).binomial(reference.X.toarray().astype(np.int64), 1 / 3)   # a third of the reads
    on_genes = thinned[:, reference.var_names.get_indexer(model.module.metadata["genes"])].sum(axis=1) > 0
    shallower = reference[on_genes].copy()
    shallower.X = thinned[on_genes].astype(np.float32)
    with pytest.warns(NoveltyDepthWarning, match="shallower cells, so they read as more novel"):
        low = model.predict_levels(shallower, novelty_cutoff=0.99)
    assert np.median(low["scvae_novelty"]) > np.median(plain["scvae_novelty"])


def test_thinning_keeps_each_cells_share_of_its_reads():
    import scipy.sparse as sp
    from scvae_hier.novelty import thinned, thinning_factor
    X = sp.csr_matrix(np.random.default_rng(1).poisson(4.0, size=(300, 50)).astype(np.float32))
    X[0] = 0
    X[0, 3] = 1                                         # a cell of one read
    kept = thinned(X, 0.25, seed=2)
    assert (kept.toarray() <= X.toarray()).all() and (kept.data == np.round(kept.data)).all()
    assert kept[1:].sum() / X[1:].sum() == pytest.approx(0.25, abs=0.01)
    np.testing.assert_array_equal(kept[0].toarray(), X[0].toarray())   # one read: were it drawn out, kept as read
    assert (np.asarray(kept.sum(axis=1)).ravel() > 0).all()          # no cell left empty
    np.testing.assert_array_equal(kept.toarray(), thinned(X, 0.25, seed=2).toarray())   # seeded
    counts = np.asarray(X.sum(axis=1)).ravel()
    assert thinning_factor(counts, {"median_counts": np.median(counts) / 4}) == pytest.approx(0.25)
    assert thinning_factor(counts, {"median_counts": np.median(counts) * 2}) == 1.0
    assert thinning_factor(counts, {}) == 1.0                        # a reference without the depth
