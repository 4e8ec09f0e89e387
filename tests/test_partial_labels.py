"""Partial labels (issue 16): labels with holes completed up the hierarchy, inconsistent labels
refused by cell, seeded stratified masks, the semi-supervised TreeVAE objective against a
computation by hand, label-aware re-seeding, hierarchical F1 by hand, and the API / CLI end to
end (given labels kept, names that nest, label transfer to a new file)."""
import json

import anndata
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import FAST
from scipy.special import logsumexp
from sklearn.metrics import adjusted_rand_score
from test_tree import SMALL_PARENTS, small_model

from scvae_hier.hierarchy import Hierarchy, HierarchyError
from scvae_hier.labels import allowed_components, complete, label_codes, parse_reveal, reveal
from scvae_hier.metrics import hierarchical_f1
from scvae_hier.tree_shape import leaf_ancestors
from scvae_hier.tree_clustering import tree_clustering

TREE = Hierarchy("leaf", ["coarse", "mid", "fine"],
                 {"a1": ("A", "Aa", "a1"), "a2": ("A", "Aa", "a2"), "b1": ("A", "Ab", "b1"),
                  "c1": ("C", "Cc", "c1"), "c2": ("C", "Cc", "c2")})


def test_label_codes_complete_coarse_levels_and_read_every_kind_of_hole():
    obs = pd.DataFrame({"coarse": ["A", np.nan, "", "C", "Unknown", "A"],
                        "mid": [np.nan, "Ab", "Cc", np.nan, np.nan, "Aa"],
                        "fine": [np.nan, np.nan, "c2", np.nan, "a2", "Unknown"]},
                       index=[f"cell{i}" for i in range(6)])
    codes = label_codes(obs, TREE, ["coarse", "mid", "fine"])
    # cell1: mid Ab -> coarse A; cell2: fine c2 -> Cc -> C; cell4: fine a2 under "Unknown" coarse.
    np.testing.assert_array_equal(codes, [[0, -1, -1], [0, 1, -1], [1, 2, 4], [1, -1, -1], [0, 0, 1], [0, 0, -1]])
    # A leaf label column: a missing label leaves every level unlabelled.
    leaf = pd.DataFrame({"leaf": ["b1", None, "c1"]})
    np.testing.assert_array_equal(label_codes(leaf, TREE), [[0, 1, 2], [-1, -1, -1], [1, 2, 3]])


def test_inconsistent_unknown_and_clashing_labels_are_refused_by_name():
    obs = pd.DataFrame({"coarse": ["A", "C", "C"], "mid": ["Aa", "Aa", "Cc"], "fine": ["a1", np.nan, "c9"]},
                       index=["good", "bad_cell", "c"])
    with pytest.raises(HierarchyError, match="not classes of level 'fine'.*'c9' \\(1 cells\\)"):
        label_codes(obs, TREE, ["coarse", "mid", "fine"])
    obs.loc["c", "fine"] = "c1"
    with pytest.raises(HierarchyError, match="bad_cell: 'Aa' under 'C'.*'Aa' is under 'A'"):
        label_codes(obs, TREE, ["coarse", "mid", "fine"])
    with pytest.raises(HierarchyError, match="unlabelled category 'Cc' is also a class"):
        label_codes(obs, TREE, ["coarse", "mid", "fine"], unlabelled_category="Cc")
    with pytest.raises(HierarchyError, match="one column per level"):
        label_codes(obs, TREE, ["coarse", "fine"])


def test_complete_agrees_with_the_paths_for_every_single_label():
    """Brute force: a cell labelled only at one level gets exactly the ancestors its path says."""
    for level in range(3):
        for k, name in enumerate(TREE.classes(level)):
            codes = np.full((1, 3), -1)
            codes[0, level] = k
            done = complete(codes, TREE)[0]
            path = next(p for p in TREE.paths.values() if p[level] == name)
            for upper in range(level + 1):
                assert TREE.classes(upper)[done[upper]] == path[upper]
            assert (done[level + 1:] == -1).all()


def test_reveal_keeps_a_seeded_stratified_share_at_the_asked_level():
    truth = np.repeat(np.arange(5), [200, 100, 50, 400, 250])
    codes = complete(np.stack([np.full(1000, -1), np.full(1000, -1), truth], 1), TREE)
    plan = parse_reveal(["fine=0.1", "2=0.2"], TREE)
    assert plan == [(2, 0.1), (1, 0.2)]
    shown = reveal(codes, plan, truth, seed=3)
    np.testing.assert_array_equal(shown, reveal(codes, plan, truth, seed=3))
    assert not np.array_equal(shown, reveal(codes, plan, truth, seed=4))
    fine = shown[:, 2] >= 0
    for k, size in enumerate([200, 100, 50, 400, 250]):  # every class keeps round(10%) fine labels
        assert fine[truth == k].sum() == round(0.1 * size)
    revealed = shown >= 0
    assert (shown[revealed] == codes[revealed]).all()            # never a wrong label
    assert (revealed[:, 0] >= revealed[:, 1]).all() and (revealed[:, 1] >= revealed[:, 2]).all()  # ancestors too
    for bad, message in (["level_9=0.1", "no level named"], ["4=0.1", "does not exist"], ["fine=2", "must be in"],
                         ["fine", "LEVEL=FRACTION"]):
        with pytest.raises(ValueError, match=message):
            parse_reveal([bad], TREE)


def test_allowed_components_match_a_brute_force_check():
    ancestors = leaf_ancestors(SMALL_PARENTS, 5)
    labels = np.array([[-1, -1, -1], [0, -1, -1], [1, 2, -1], [0, 0, 1], [1, -1, 4]])
    allowed = allowed_components(labels, ancestors)
    for i, row in enumerate(labels):
        for m in range(5):
            expected = all(row[l] < 0 or ancestors[l][m] == row[l] for l in range(3))
            assert allowed[i, m] == expected


def test_semi_supervised_terms_restrict_q_and_add_the_classification_loss():
    """By hand: a labelled cell's classification term is -log of q(c|x) summed over its allowed
    components, its ELBO is the bound with q restricted to them, and an unlabelled cell's terms
    are the unsupervised ones."""
    model = small_model(semi_supervised=True, label_weight=2.0)
    plain = small_model()
    model.build(), plain.build()
    plain.set_weights(model.get_weights()[:len(plain.get_weights())])
    rng = np.random.default_rng(1)
    model.prior_logits.assign(rng.normal(size=5).astype("float32"))
    plain.prior_logits.assign(model.prior_logits.numpy())
    x = tf.constant(rng.poisson(3.0, size=(3, 7)).astype("float32"))
    noise = tf.constant(rng.normal(size=(3, 2)).astype("float32"))
    labels = tf.constant([[-1, -1, -1], [0, -1, -1], [1, 2, -1]])
    terms = {k: v.numpy() for k, v in model.terms(x, noise=noise, labels=labels).items()}
    free = {k: v.numpy() for k, v in plain.terms(x, noise=noise).items()}
    log_qc, loc, scale = (t.numpy() for t in model.encode(x))
    allowed = allowed_components(labels.numpy(), model.component_ancestors)
    np.testing.assert_allclose(terms["classification"], -logsumexp(np.where(allowed, log_qc, -np.inf), axis=1),
                               rtol=1e-5, atol=1e-6)
    assert terms["classification"][0] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(terms["elbo"][0], free["elbo"][0], rtol=1e-5)          # unlabelled: unchanged
    # Labelled: the bound is reconstruction + log sum_{c allowed} p(c) exp(-KL_c), the ELBO of the
    # optimal q(c|x) ~ p(c) exp(-KL_c) restricted to the allowed components; against the full sum,
    # it is lower by exactly -log q(allowed|x), the classification term.
    np.testing.assert_allclose(terms["elbo"] - free["elbo"], -terms["classification"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(terms["loss"], free["loss"] - (terms["elbo"] - free["elbo"])
                               + 2.0 * terms["classification"]
                               + (terms["marginal_usage"] - free["marginal_usage"]), rtol=1e-4, atol=1e-3)


def test_label_aware_reseeding_keeps_labelled_cells_under_their_leaves():
    """Two leaves of one parent that k-means alone would swap: the labelled cells decide."""
    ancestors = leaf_ancestors(SMALL_PARENTS, 5)
    centres = np.stack([10.0 * ancestors[0], 5.0 * ancestors[1], 2.5 * ancestors[2]], axis=1)
    truth = np.repeat(np.arange(5), 80)
    latent = centres[truth] + 0.2 * np.random.default_rng(3).normal(size=(400, 3))
    labels = np.full((400, 3), -1)
    labels[::10, 2] = truth[::10]                           # 10% labelled at the leaves
    labels = complete(labels, Hierarchy("l", ["a", "b", "c"], {str(m): tuple(f"{l}:{ancestors[l][m]}" for l in range(3))
                                                               for m in range(5)}))
    allowed = allowed_components(labels, ancestors)
    component = tree_clustering(latent, SMALL_PARENTS, 5, allowed=allowed)
    np.testing.assert_array_equal(component, truth)        # every cell, labelled or not, under its true leaf
    # Wrong labels on a few points of a compact cluster: those points still go where labels say.
    labels_wrong = labels.copy()
    labels_wrong[0] = [1, 2, 4]
    component = tree_clustering(latent, SMALL_PARENTS, 5, allowed=allowed_components(labels_wrong, ancestors))
    assert component[0] == 4


def test_treevae_with_labels_runs_longer_by_default_unless_told(pbmc_slice):
    """Semi-supervised TreeVAE defaults to 200 epochs at most (it still gained after 100 on
    validation cells), in the options the CLI builds and in the Python API; unsupervised runs and
    the other models keep 100 (IndMoMVAE lost at level 3 when trained longer), and an explicit
    number of epochs wins."""
    import scvae_hier as sh
    from scvae_hier.options import TrainOptions

    assert TrainOptions(data="x.h5ad", model="tree").epochs == 100
    assert TrainOptions(data="x.h5ad", model="tree", labelled=("level_4=0.1",)).epochs == 200
    assert TrainOptions(data="x.h5ad", model="tree", semi_supervised=True).epochs == 200
    assert TrainOptions(data="x.h5ad", model="indmom", semi_supervised=True).epochs == 100
    assert TrainOptions(data="x.h5ad", model="mixture", labelled=("level_4=0.1",)).epochs == 100
    assert TrainOptions(data="x.h5ad", model="tree", hide_labels=("cd14_monocytes",)).epochs == 200
    assert TrainOptions(data="x.h5ad", model="tree", labelled=("level_4=0.1",), epochs=7).epochs == 7
    adata = anndata.read_h5ad(pbmc_slice)
    sh.TreeVAE.setup_anndata(adata)
    assert sh.TreeVAE(adata, semi_supervised=True, n_genes=200).options.epochs == 200
    assert sh.TreeVAE(adata, n_genes=200).options.epochs == 100


def test_hierarchical_f1_by_hand():
    truth = np.array([["A", "Aa", "a1"], ["C", "Cc", "c1"]], dtype=object)
    guess = np.array([["A", "Ab", "b1"], ["C", "unassigned", "unassigned"]], dtype=object)
    # cell 1: 1 of 3 nodes right (A); cell 2: 1 predicted node, right. P = 2/4, R = 2/6.
    p, r = 2 / 4, 2 / 6
    assert hierarchical_f1(truth, guess) == pytest.approx(2 * p * r / (p + r))
    assert hierarchical_f1(truth, truth) == 1.0
    # A leaf name repeated under another parent is another node.
    assert hierarchical_f1([["A", "x"]], [["B", "x"]]) == 0.0


def test_novel_classes_add_an_unassigned_branch():
    from types import SimpleNamespace

    from scvae_hier.models.tree import TreeVAE
    options = SimpleNamespace(model="tree", level_sizes=None, prior="normal", marginal_usage=1.0,
                              usage_target="uniform", usage_level_weights=None, components_per_leaf=1,
                              prior_probabilities="uniform", reseed_epochs=(), reseed_clusters=2, final_refit=0,
                              semi_supervised=True, label_weight=50.0, novel_classes=2)
    arguments = TreeVAE.arguments_from(options, TREE)
    assert arguments["level_sizes"] == [3, 4, 7]
    assert arguments["parents"] == [[0, 0, 1, 2], [0, 0, 1, 2, 2, 3, 3]]
    model = TreeVAE(9, **{k: v for k, v in arguments.items()})
    labelled = allowed_components(np.array([[0, -1, -1], [-1, -1, -1]]), model.component_ancestors)
    assert not labelled[0, 5:].any() and labelled[1].all()   # a labelled cell is never novel


def _partial_adata(pbmc_slice):
    """The slice with each cell labelled down to a random depth (none for 30%, the finest level for
    40%), and some fine labels without their coarse ones (completed from the hierarchy)."""
    adata = anndata.read_h5ad(pbmc_slice)
    rng = np.random.default_rng(0)
    depth = rng.choice(5, size=adata.n_obs, p=[0.3, 0.1, 0.1, 0.1, 0.4])
    for level in range(1, 5):
        values = adata.obs[f"level_{level}"].astype(object)
        values[depth < level] = np.nan
        if level == 1:
            values.iloc[np.flatnonzero(depth == 4)[:20]] = np.nan
        adata.obs[f"level_{level}"] = values
    return adata


def test_api_trains_on_labels_with_holes_keeps_given_labels_and_names_nest(pbmc_slice, tmp_path, capsys):
    import scvae_hier as sh

    adata = _partial_adata(pbmc_slice)
    levels = ["level_1", "level_2", "level_3", "level_4"]
    sh.TreeVAE.setup_anndata(adata, levels=levels)
    model = sh.TreeVAE(adata, semi_supervised=True, n_genes=80, latent_dim=4, hidden=(16, 16), xla=False)
    assert model.module.semi_supervised and model.cells.labels.shape == (adata.n_obs, 4)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    assert "classification" in model.history.columns
    table = model.predict_levels()
    labelled = adata.obs[levels].notna().any(axis=1).to_numpy()
    np.testing.assert_array_equal(table["scvae_labelled"].to_numpy(bool), labelled)   # which names are given ones
    assert "scvae_labelled" not in model.predict_levels(keep_labels=False)
    truth = anndata.read_h5ad(pbmc_slice).obs
    paths = {tuple(p) for p in model.hierarchy.paths.values()}
    predicted = table[[f"scvae_{level}" for level in levels]].astype(str).to_numpy()
    assert all(tuple(p) in paths for p in predicted)                         # names form a path for every cell
    for level in levels:                                                     # given labels are kept
        given = adata.obs[level].notna().to_numpy()
        assert given.any()
        np.testing.assert_array_equal(table[f"scvae_{level}"].astype(str)[given], truth[level].astype(str)[given])
    # With a threshold of 1 every cell is unassigned from level 1 on (probabilities are below 1).
    cautious = model.predict_levels(keep_labels=False, unassigned_below=1.0)
    assert (cautious["scvae_level_4"].astype(str) == "unassigned").mean() > 0.9
    # Kept labels stay kept under either rule; "unassigned" starts below a cell's deepest given label.
    depth = (model.cells.labels >= 0).sum(axis=1)                      # labels are completed upwards
    for rule in ({"unassigned_below": 1.0}, {"novelty_cutoff": 0.0}):
        kept = model.predict_levels(**rule)
        for i, level in enumerate(levels):
            names = kept[f"scvae_{level}"].astype(str).to_numpy()
            np.testing.assert_array_equal(names[depth > i], table[f"scvae_{level}"].astype(str).to_numpy()[depth > i])
            assert (names[depth <= i] == "unassigned").mean() > 0.9
    # Class probabilities at the temperature fitted on the labelled validation cells (calibration):
    # the same fit by hand on the uncalibrated posterior, which it only tempers; no call moves.
    from scvae_hier.calibration import ancestors_of, fit_temperature, tempered
    temperature = model.temperature
    assert temperature == model.module.metadata["temperature"]
    calibrated, calls = model.predict_probabilities(level=-1), model.predict_levels()
    del model.module.metadata["temperature"]
    raw = model.predict_probabilities(level=-1)
    validation = model.split == "validation"
    assert fit_temperature(raw.loc[model.cells.adata.obs_names[validation]].to_numpy(), ancestors_of(model.module),
                           model.cells.labels[validation]) == temperature
    pd.testing.assert_frame_equal(model.predict_levels().drop(columns=[c for c in calls if c.endswith("_probability")]),
                                  calls.drop(columns=[c for c in calls if c.endswith("_probability")]))
    model.module.metadata["temperature"] = temperature
    modelled = raw.notna().all(axis=1).to_numpy()
    np.testing.assert_allclose(calibrated[modelled], tempered(raw[modelled].to_numpy(), temperature), rtol=1e-5, atol=1e-7)
    # Label transfer through the CLI: the saved model annotates a query file with genes shuffled.
    model.save(tmp_path / "model")
    assert sh.load(tmp_path / "model").temperature == temperature
    query = anndata.read_h5ad(pbmc_slice)[:50]
    query = query[:, np.random.default_rng(1).permutation(query.n_vars)].copy()
    query.write_h5ad(tmp_path / "query.h5ad")
    from scvae_hier.cli import main
    assert main(["annotate", str(tmp_path / "model"), str(tmp_path / "query.h5ad"),
                 "--output", str(tmp_path / "annotated.h5ad")]) == 0
    annotated = anndata.read_h5ad(tmp_path / "annotated.h5ad")
    expected = model.predict_levels(anndata.read_h5ad(pbmc_slice)[:50].copy())
    np.testing.assert_array_equal(annotated.obs["scvae_level_4"].astype(str), expected["scvae_level_4"].astype(str))
    np.testing.assert_allclose(annotated.obsm["X_scvae"],                 # the API's latent of the same cells
                               model.get_latent_representation(anndata.read_h5ad(pbmc_slice)[:50].copy()), rtol=1e-5)
    # Every class's probability at every level, named, as predict_probabilities gives them; TreeVAE's
    # levels nest: a class's probability is the sum of its children's (children found from the paths).
    classes = annotated.uns["scvae_annotation"]["classes"]
    soft = {level: model.predict_probabilities(anndata.read_h5ad(pbmc_slice)[:50].copy(), level=level) for level in levels}
    for i, level in enumerate(levels):
        assert list(classes[level]) == list(soft[level].columns)
        np.testing.assert_allclose(annotated.obsm[f"scvae_{level}_probabilities"], soft[level].to_numpy(), rtol=1e-5)
        np.testing.assert_allclose(soft[level].sum(axis=1), 1.0, atol=1e-5)
        called = expected[f"scvae_{level}"].astype(str).to_numpy()      # the call's probability is its column's
        column = soft[level].columns.get_indexer(called)
        assert (column >= 0).all()
        np.testing.assert_allclose(soft[level].to_numpy()[np.arange(len(called)), column],
                                   expected[f"scvae_{level}_probability"], rtol=1e-5)
        if level == levels[-1]:                 # calls are the most probable leaf and its ancestors
            np.testing.assert_array_equal(soft[level].idxmax(axis=1).to_numpy(), called)
        if i:
            for parent in soft[levels[i - 1]].columns:
                children = {path[i] for path in model.hierarchy.paths.values() if path[i - 1] == parent}
                np.testing.assert_allclose(soft[levels[i - 1]][parent],
                                           soft[level][[c for c in soft[level].columns if c in children]].sum(axis=1),
                                           atol=1e-5, err_msg=f"{parent} at {levels[i - 1]}")
    # A query laid out as scanpy leaves it: log-normalised X, raw counts in a layer. Refused with
    # the fix named, and the fix works (same names as from the counts themselves).
    import scanpy as sc
    layered = query.copy()
    layered.layers["counts"] = layered.X.copy()
    sc.pp.normalize_total(layered)
    sc.pp.log1p(layered)
    layered.write_h5ad(tmp_path / "layered.h5ad")
    capsys.readouterr()
    assert main(["annotate", str(tmp_path / "model"), str(tmp_path / "layered.h5ad"),
                 "--output", str(tmp_path / "x.h5ad")]) == 2
    assert "non-integer" in capsys.readouterr().err
    assert main(["annotate", str(tmp_path / "model"), str(tmp_path / "layered.h5ad"), "--layer", "counts",
                 "--output", str(tmp_path / "layered_annotated.h5ad")]) == 0
    layered_annotated = anndata.read_h5ad(tmp_path / "layered_annotated.h5ad")
    np.testing.assert_array_equal(layered_annotated.obs["scvae_level_4"].astype(str), expected["scvae_level_4"].astype(str))
    np.testing.assert_allclose(layered_annotated.X.toarray(), layered.X.toarray(), rtol=1e-6)  # its own X kept
    # A query without the model's genes is refused by name.
    dropped = model.module.metadata["genes"][:3]
    query[:, ~query.var_names.isin(dropped)].copy().write_h5ad(tmp_path / "missing.h5ad")
    assert main(["annotate", str(tmp_path / "model"), str(tmp_path / "missing.h5ad"),
                 "--output", str(tmp_path / "x.h5ad")]) == 2
    assert dropped[0] in capsys.readouterr().err


def test_semi_supervised_mixture_is_calibrated_like_the_tree(pbmc_slice):
    """The flat MixtureVAE with labels reads its levels as sums of its components (leaves), so it
    gets a temperature too: the fit redone by hand on its uncalibrated posterior, which calibration
    only tempers (an extra, unnamed component included, under `unassigned`); no call moves."""
    import scvae_hier as sh
    from scvae_hier.calibration import ancestors_of, applies, fit_temperature, tempered
    from scvae_hier.outputs import PREDICT_BATCH_SIZE, predict_outputs

    adata = _partial_adata(pbmc_slice)
    levels = ["level_1", "level_2", "level_3", "level_4"]
    sh.MixtureVAE.setup_anndata(adata, levels=levels)
    n_leaves = len(Hierarchy.from_anndata(adata).classes(-1))
    model = sh.MixtureVAE(adata, semi_supervised=True, n_components=n_leaves + 1, n_genes=80, latent_dim=4,
                          hidden=(16, 16), xla=False)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    assert applies(model.module) and ancestors_of(model.module).shape == (4, n_leaves + 1)
    temperature = model.temperature
    calls = model.predict_levels()
    X = model.cells.adata.X
    calibrated = predict_outputs(model.module, X, PREDICT_BATCH_SIZE, model.cells.covariates)
    del model.module.metadata["temperature"]
    raw = predict_outputs(model.module, X, PREDICT_BATCH_SIZE, model.cells.covariates)
    validation = model.split == "validation"
    assert fit_temperature(raw["level_4_probabilities"][validation], ancestors_of(model.module),
                           model.cells.labels[validation]) == temperature
    assert temperature != 1.0
    np.testing.assert_allclose(calibrated["level_4_probabilities"],
                               tempered(raw["level_4_probabilities"], temperature), rtol=1e-4, atol=1e-6)
    # Every class the sum of its components, the extra one's included: the model's own coarse
    # posteriors (summed in TensorFlow by its level masks) agree with calibration's ancestors, so
    # the calibrated coarse levels are the tempered components summed the same way.
    ancestors = ancestors_of(model.module)
    for outputs in (raw, calibrated):
        for level in range(3):
            for c in range(outputs[f"level_{level + 1}_probabilities"].shape[1]):
                np.testing.assert_allclose(outputs[f"level_{level + 1}_probabilities"][:, c],
                                           outputs["level_4_probabilities"][:, ancestors[level] == c].sum(axis=1),
                                           atol=1e-5)
    names = [c for c in calls if not c.endswith("_probability")]
    pd.testing.assert_frame_equal(model.predict_levels()[names], calls[names])


def test_a_type_labelled_only_at_a_coarse_level_is_its_own_leaf(pbmc_slice):
    """Monocytes labelled "Monocyte" at level 2 and never below: their class is a leaf of its own
    (it was refused as "not a class of level 2"), the model has a leaf for it, and the cells keep
    the name down to the finest level."""
    import scvae_hier as sh

    adata = _partial_adata(pbmc_slice)
    levels = ["level_1", "level_2", "level_3", "level_4"]
    monocytes = (adata.obs["source_library"] == "cd14_monocytes").to_numpy()
    adata.obs.loc[monocytes, "level_2"] = "Monocyte"
    adata.obs.loc[monocytes, ["level_3", "level_4"]] = np.nan
    sh.TreeVAE.setup_anndata(adata, levels=levels)
    model = sh.TreeVAE(adata, semi_supervised=True, n_genes=80, latent_dim=4, hidden=(16, 16), xla=False)
    assert model.hierarchy.paths["Monocyte"] == ("Non-stem", "Monocyte", "Monocyte", "Monocyte")
    assert model.hierarchy.sizes == [2, 5, 6, 10]
    model.train(max_epochs=1, batch_size=64, progress_bar=False)
    table = model.predict_levels()
    assert (table.loc[monocytes, "scvae_level_4"].astype(str) == "Monocyte").all()
    assert (table.loc[~monocytes, "scvae_level_2"].astype(str) != "Monocyte").mean() > 0.5


def test_cli_labelled_mask_labels_csv_and_bad_input(pbmc_slice, tmp_path, capsys):
    from scvae_hier.cli import main

    run = tmp_path / "run"
    common = ["train", str(pbmc_slice), "--model", "tree", *FAST, "--epochs", "2", "--output", str(run)]
    assert main([*common, "--labelled", "level_4=0.1", "--seed", "1"]) == 0
    labels = pd.read_csv(run / "labels.csv", index_col="cell", keep_default_na=False)
    assert ((labels["level_4"] != "").sum()) == 60                  # 10% of each of the ten populations of 60
    assert ((labels["level_1"] != "") == (labels["level_4"] != "")).all()
    outputs = anndata.read_h5ad(run / "outputs.h5ad")
    assert outputs.obs["labelled"].sum() == 60 and "scvae_level_4" in outputs.obs
    scored = json.loads((run / "metrics.json").read_text())["ari_scored_cells"]   # the mask keeps every truth
    assert scored["all"] == {"cells": 600, "labelled": 60} and scored["unlabelled"] == {"cells": 540, "labelled": 0}
    printed = capsys.readouterr().out
    assert "(unlabelled cells; 540 with a true label, 0 of them given it in training)" in printed
    assert "No never-labelled cell" not in printed
    # 10% labelled leaves about 6 of the 60 validation cells labelled: too few to fit a temperature.
    assert "temperature" not in json.loads((run / "metrics.json").read_text()) and "temperature" not in printed
    for flags, message in ((["--labelled", "level_7=0.1"], "no level named 'level_7'"),
                           (["--labelled", "level_4=0.1", "--model", "vae"], "plain vae has none"),
                           (["--hide-labels", "not_a_label"], "--hide-labels \\['not_a_label'\\]")):
        assert main([*common[:-1], str(tmp_path / "bad"), *flags]) == 2
        assert any(part in capsys.readouterr().err for part in message.split("\\"))


def test_cli_with_real_holes_says_its_scores_are_on_labelled_cells(pbmc_slice, tmp_path, capsys, drawn_figures):
    """With labels that have holes, the cells with a true label are the labelled ones: the printed
    ARI is a fit to the given labels, and the CLI says so instead of passing it off as accuracy.
    `evaluate` and `analyse` score and draw the cells with a true label (they refused the unlabelled
    category as a label outside the hierarchy before)."""
    from scvae_hier.cli import main

    data = tmp_path / "holes.h5ad"
    adata = _partial_adata(pbmc_slice)
    adata.write_h5ad(data)
    run = tmp_path / "run"
    assert main(["train", str(data), "--model", "tree", *FAST, "--epochs", "2", "--semi-supervised",
                 "--levels", "level_1", "level_2", "level_3", "level_4", "--output", str(run),
                 "--exclude-labels", "CD14+ monocyte"]) == 0    # the nine populations of the scVAE run below
    monocytes = adata.obs["source_library"] == "cd14_monocytes"
    named = monocytes & adata.obs["level_2"].notna()
    assert (named & adata.obs["level_4"].isna()).sum() > 0
    # Cells labelled "Monocyte" above the excluded leaf (its only one) are left out with it; cells
    # whose labels do not say so (none, or "Non-stem" only) stay, unlabelled below.
    trained = pd.read_csv(run / "split.csv")["cell"]
    assert not trained.isin(adata.obs_names[named]).any()
    assert trained.isin(adata.obs_names[monocytes & ~named]).sum() == (monocytes & ~named).sum() > 0
    adata = adata[~named]                                            # the cells the run holds
    levels = ["level_1", "level_2", "level_3", "level_4"]
    # A cell has a truth when its labels leave one leaf open (a fine label, or "B cell" at level 2:
    # one leaf below it), by brute force over the hierarchy's paths.
    paths = [p for p in anndata.read_h5ad(pbmc_slice).obs[levels].drop_duplicates().to_numpy()
             if p[-1] != "CD14+ monocyte"]
    given = adata.obs[levels].to_numpy()
    open_leaves = [[p[-1] for p in paths if all(pd.isna(g) or g == c for g, c in zip(row, p))] for row in given]
    implied = pd.Series([leaves[0] if len(leaves) == 1 and pd.notna(row).any() else None
                         for leaves, row in zip(open_leaves, given)], index=adata.obs_names)
    assert (implied.notna() & adata.obs["level_4"].isna()).sum() > 0          # cells scored through coarse labels
    scored = json.loads((run / "metrics.json").read_text())["ari_scored_cells"]
    fine = int(implied.notna().sum())
    assert scored["all"] == {"cells": fine, "labelled": fine} and "unlabelled" not in scored
    printed = capsys.readouterr().out
    assert f"(all cells; {fine} with a true label, {fine} of them given it in training)" in printed
    temperature = json.loads((run / "metrics.json").read_text())["temperature"]   # most validation cells labelled
    assert f"calibrated on the labelled validation cells: temperature {temperature:.2f}" in printed
    assert "No never-labelled cell has a true label" in printed and "--labelled LEVEL=FRACTION" in printed
    assert main(["evaluate", str(run), "--iwae-samples", "2"]) == 0
    cells = anndata.read_h5ad(run / "evaluation" / "test" / "cells.h5ad")
    truth = implied[cells.obs_names].notna().to_numpy()
    assert 0 < truth.sum() < len(truth)
    np.testing.assert_array_equal(cells.obs["scvae_scored"].to_numpy(bool), truth)
    np.testing.assert_array_equal(cells.obs["level_4"].astype(str)[truth], implied[cells.obs_names][truth])
    table = pd.read_csv(run / "evaluation" / "test" / "level_metrics.csv", index_col="level")
    clusters = cells.obs["scvae_level_2_cluster"].astype(int).to_numpy()[truth]
    assert table.loc["level_2", "ari"] == pytest.approx(adjusted_rand_score(cells.obs["level_2"][truth], clusters))
    printed = capsys.readouterr().out
    assert f"Scored on the {truth.sum()} of these cells with a true label, {truth.sum()} of them given it" in printed
    assert main(["analyse", str(run), "--iwae-samples", "2"]) == 0
    assert f"(scVAE's accuracy). Scored on the {truth.sum()} of these cells" in (run / "report.md").read_text()
    confusion = [ax for ax in drawn_figures["confusion_matrices.png"].axes if ax.images]
    assert all(sum(int(t.get_text()) for t in ax.texts) == fine for ax in confusion)   # every cell with a truth
    assert f"have no true leaf label; the figures show the other {fine}" in capsys.readouterr().out
    # The original scVAE, compared on the same cells: those with a truth (it refused the holes before).
    from test_evaluate_cli import FIXTURE
    from scvae_hier.analysis.scvae_runs import read_scvae_run
    assert main(["analyse", str(run), "--scvae", str(FIXTURE), "--output", str(tmp_path / "c"),
                 "--no-figures", "--iwae-samples", "2"]) == 0
    rows = pd.read_csv(tmp_path / "c" / "runs.csv")
    scvae = rows[(rows["group"] == "original scVAE") & (rows["level"] == "level_2")].iloc[0]
    theirs = read_scvae_run(FIXTURE).cluster_ids.loc[cells.obs_names[truth]].to_numpy()
    assert scvae["n_cells"] == truth.sum()
    assert scvae["ari"] == pytest.approx(adjusted_rand_score(cells.obs["level_2"][truth], theirs))


def test_pl_levels_draws_holes_as_unlabelled_and_scores_only_labelled_cells(pbmc_slice):
    """sh.pl.levels on labels with holes (it refused "Unknown" as a label outside the hierarchy):
    the true panels show every cell, holes as "unlabelled", a fine label's ancestors filled in; the
    share that agrees counts only cells labelled at that level, checked by hand."""
    import matplotlib

    matplotlib.use("Agg")
    import scvae_hier as sh

    adata = _partial_adata(pbmc_slice)
    levels = ["level_1", "level_2", "level_3", "level_4"]
    for level in levels[2:]:                        # the unlabelled category as well as NaN
        adata.obs[level] = adata.obs[level].astype(object).where(adata.obs[level].notna(), "Unknown")
    sh.TreeVAE.setup_anndata(adata, levels=levels)
    truth = anndata.read_h5ad(pbmc_slice).obs
    rng = np.random.default_rng(3)
    for level in levels:                            # predictions: the truth with 20% of the cells rotated
        names = truth[level].astype(str).to_numpy().copy()
        wrong = rng.random(len(names)) < 0.2
        names[wrong] = np.roll(names, 7)[wrong]
        adata.obs[f"scvae_{level}"] = names
    adata.obsm["X_umap"] = rng.normal(size=(adata.n_obs, 2))
    figure = sh.pl.levels(adata)
    labelled = np.column_stack([adata.obs[level].notna() & (adata.obs[level].astype(str) != "Unknown")
                                for level in levels])
    for i, level in enumerate(levels):
        known = labelled[:, i:].any(axis=1)         # labelled at this level or below it
        expected = np.mean(adata.obs[f"scvae_{level}"].to_numpy()[known] == truth[level].astype(str).to_numpy()[known])
        assert figure.axes[4 + i].get_title() == f"{level}: predicted ({expected:.0%} of {known.sum()} labelled agree)"
        legend = [t.get_text() for t in figure.axes[i].get_legend().get_texts()]
        assert f"unlabelled ({(~known).sum()})" in legend and 0 < known.sum() < adata.n_obs
        assert figure.axes[i].collections[0].get_offsets().shape[0] == adata.n_obs
    # Cells named by the labels they were given (predict_levels' scvae_labelled) agree by
    # construction: the share leaves them out and says so.
    adata.obs["scvae_labelled"] = labelled[:, 0] & (rng.random(adata.n_obs) < 0.5)
    title = sh.pl.levels(adata).axes[4].get_title()
    known = labelled.any(axis=1) & ~adata.obs["scvae_labelled"].to_numpy()
    expected = np.mean(adata.obs["scvae_level_1"].to_numpy()[known] == truth["level_1"].astype(str).to_numpy()[known])
    assert title == f"level_1: predicted ({expected:.0%} of {known.sum()} labelled cells not given their labels agree)"


def test_reseeding_puts_a_type_nobody_labelled_under_the_novel_leaf():
    """Five labelled types (10% labelled) and a sixth, never labelled, far from them: with one
    novel leaf, the sixth type's clusters (no labelled cell where about 8 were expected) go under
    it; without the rule they would take a named leaf that costs no label."""
    ancestors = leaf_ancestors(SMALL_PARENTS, 5)
    rng = np.random.default_rng(4)
    centres = np.stack([10.0 * ancestors[0], 5.0 * ancestors[1], 2.5 * ancestors[2]], axis=1)
    centres = np.vstack([centres, [[-12.0, -12.0, 0.0]]])                     # the sixth type
    truth = np.repeat(np.arange(6), 200)
    latent = centres[truth] + 0.3 * rng.normal(size=(1200, 3))
    parents = [[0, 0, 1, 2], [0, 1, 1, 2, 2, 3]]                              # 3 / 4 / 6: leaf 5 is novel
    novel_ancestors = leaf_ancestors(parents, 6)
    labels = np.full((1200, 3), -1)
    chosen = rng.random(1200) < 0.1
    labels[chosen & (truth < 5)] = novel_ancestors[:, truth[chosen & (truth < 5)]].T
    allowed = allowed_components(labels, novel_ancestors)
    component = tree_clustering(latent, parents, 6, allowed=allowed, novel=1)
    assert (component[truth == 5] == 5).all()
    np.testing.assert_array_equal(component[truth < 5], truth[truth < 5])


def test_no_labelled_cell_is_refused(pbmc_slice):
    """Semi-supervised training with every label missing is refused before training (an unknown
    query batch is refused in tests/test_query.py, on its trained reference)."""
    import scvae_hier as sh
    from scvae_hier.data import DataError

    adata = anndata.read_h5ad(pbmc_slice)
    sh.TreeVAE.setup_anndata(adata, levels=["level_1", "level_2", "level_3", "level_4"], batch_key="source_dataset")
    unlabelled = adata.copy()
    for level in ("level_1", "level_2", "level_3", "level_4"):
        unlabelled.obs[level] = np.nan
    unlabelled.uns = adata.uns
    with pytest.raises(DataError, match="no cell has a label"):
        sh.TreeVAE(unlabelled, semi_supervised=True, n_genes=80, latent_dim=4, hidden=(16, 16), xla=False)
    sh.TreeVAE(adata, semi_supervised=True, n_genes=80, latent_dim=4, hidden=(16, 16), xla=False)   # labelled: built
