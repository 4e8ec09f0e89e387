"""The AnnData-first Python API on real cells: setup checks, training, results back into the
caller's AnnData by obs_names, named nested predictions, save/load, gene alignment by name,
sampling from a hierarchy node, and that the command line trains the very same model."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scvae_hier as sh
from scvae_hier.api import SetupError
from scvae_hier.data import DataError
from scvae_hier.cli import main

TINY = dict(n_genes=80, latent_dim=3, hidden=(16, 16), drop_empty_cells=True)
TRAIN = dict(max_epochs=2, warm_up=1, batch_size=64, xla=False, progress_bar=False)


@pytest.fixture(scope="module")
def cells(pbmc_slice):
    adata = anndata.read_h5ad(pbmc_slice)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # what a scanpy user holds in X after normalising
    return adata


@pytest.fixture(scope="module")
def momix(cells):
    adata = cells.copy()
    sh.MoMixVAE.setup_anndata(adata, layer="counts", levels=["level_1", "level_2", "level_3", "level_4"],
                              batch_key="source_dataset")
    return sh.MoMixVAE(adata, **TINY).train(**TRAIN)


@pytest.fixture(scope="module")
def flat_mixture(cells):
    adata = cells.copy()
    sh.MixtureVAE.setup_anndata(adata, layer="counts")  # the shipped uns['hierarchy']
    return sh.MixtureVAE(adata, **TINY).train(**TRAIN)


@pytest.fixture(scope="module")
def plain_vae(cells):
    adata = cells.copy()
    sh.VAE.setup_anndata(adata, layer="counts")
    return sh.VAE(adata, **TINY).train(**TRAIN)


def test_setup_refuses_what_it_cannot_use(cells):
    adata = cells.copy()
    with pytest.raises(SetupError, match="not set up.*setup_anndata"):
        sh.MoMixVAE(adata)
    with pytest.raises(SetupError, match="no layer 'raw'.*counts"):
        sh.MoMixVAE.setup_anndata(adata, layer="raw")
    with pytest.raises(DataError, match="non-integer"):
        sh.MoMixVAE.setup_anndata(adata)  # X holds log1p values, not counts
    with pytest.raises(ValueError, match="no column.*level_9"):
        sh.MoMixVAE.setup_anndata(adata, layer="counts", levels=["level_1", "level_9"])
    with pytest.raises(SetupError, match="batch_key 'donor'"):
        sh.MoMixVAE.setup_anndata(adata, layer="counts", batch_key="donor")
    sh.MoMixVAE.setup_anndata(adata, layer="counts", levels=["level_2", "level_4"])
    with pytest.raises(TypeError, match="Unknown option.*latent_dims"):
        sh.MoMixVAE(adata, latent_dims=3)
    model = sh.MoMixVAE(adata, **TINY)
    with pytest.raises(TypeError, match="Unknown training setting.*epochs"):
        model.train(epochs=3)
    with pytest.raises(RuntimeError, match="not trained yet"):
        model.get_latent_representation()
    assert model.level_names == ["level_2", "level_4"] and model.module.level_sizes == (5, 10)


def test_results_go_back_to_the_callers_cells(momix):
    adata = momix.adata
    latent = momix.get_latent_representation()
    assert latent.shape == (adata.n_obs, 3)
    modelled = adata.obs_names.isin(momix.cells.adata.obs_names)
    # Cells dropped for having no counts on the model's genes get NaN, never a shifted row.
    assert np.isnan(latent[~modelled]).all() and np.isfinite(latent[modelled]).all()
    assert momix.history.index.tolist() == [0, 1] and "val_elbo" in momix.history
    levels = momix.predict_levels()
    assert list(levels.index) == list(adata.obs_names)
    for level in ["level_1", "level_2", "level_3", "level_4"]:
        names = levels[f"scvae_{level}"].dropna().astype(str)
        classes = set(momix.hierarchy.classes(level))
        assert names.map(lambda n: n in classes or n.startswith("cluster ")).all()
        probability = levels[f"scvae_{level}_probability"][modelled]
        assert ((probability > 0) & (probability <= 1 + 1e-6)).all()
    # The named prediction is the matched class of the predicted cluster, cell by cell.
    matched = momix.module.metadata["cluster_names"]["level_2"]
    row = levels[modelled].iloc[0]
    assert row["scvae_level_2"] == (matched[int(row["scvae_level_2_cluster"])] or
                                    f"cluster {int(row['scvae_level_2_cluster'])}")
    adata.obs = adata.obs.join(levels)  # the documented way in; no clash with the true level columns
    assert "scvae_level_4" in adata.obs and "level_4" in adata.obs


def test_save_load_round_trip_and_genes_aligned_by_name(momix, tmp_path):
    adata = momix.adata
    before = momix.get_latent_representation()
    momix.save(tmp_path / "model")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        momix.save(tmp_path / "model")
    loaded = sh.MoMixVAE.load(tmp_path / "model", adata=adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), before)
    pd.testing.assert_frame_equal(loaded.predict_levels(), momix.predict_levels())
    assert isinstance(sh.load(tmp_path / "model"), sh.MoMixVAE)
    with pytest.raises(SetupError, match="holds a MoMixVAE, not a MixtureVAE"):
        sh.MixtureVAE.load(tmp_path / "model")

    reordered = adata[:, adata.var_names[::-1]].copy()  # same genes, reversed order
    np.testing.assert_array_equal(loaded.get_latent_representation(reordered), before)
    genes = momix.module.metadata["genes"]
    missing = adata[:, ~adata.var_names.isin(genes[:2])].copy()
    with pytest.raises(DataError, match=f"2 of the 80 required genes are missing.*{genes[0]}"):
        sh.load(tmp_path / "model", adata=missing)


def test_sample_cells_of_a_hierarchy_node(momix):
    named = [n for n in momix.module.metadata["cluster_names"]["level_2"] if n]
    node = named[0]
    sample = momix.sample(n=100, node=node, seed=1)
    assert sample.shape == (100, 80) and list(sample.var_names) == momix.module.metadata["genes"]
    counts = sample.X.toarray()
    assert (counts >= 0).all() and (counts == np.round(counts)).all() and counts.sum() > 0
    assert (sample.obs["node"] == node).all()
    assert set(sample.obs["source_dataset"]) <= set(momix.module.metadata["batch_counts"])
    again = momix.sample(n=100, node=node, seed=1)
    np.testing.assert_array_equal(again.X.toarray(), counts)  # seeded
    with pytest.raises(SetupError, match="'Neuron' is not a class of the hierarchy"):
        momix.sample(n=5, node="Neuron")
    with pytest.raises(ValueError, match="Unknown batch 'x'"):
        momix.sample(n=5, node=node, batch="x")


def _numpy_draw(log_q, loc, scale, rng):
    """One z per cell from q(z|x) = sum_y q(y|x) N(loc_y, scale_y), with numpy: y first, then z."""
    y = (rng.random((len(log_q), 1)) > np.cumsum(np.exp(log_q), axis=1)).sum(axis=1).clip(max=log_q.shape[1] - 1)
    picked = np.arange(len(log_q))
    return loc[picked, y] + scale[picked, y] * rng.standard_normal(loc[picked, y].shape)


def _decoded_shares(module, latent, onehot):
    """The decoder's NB means by hand (`_decoded_means`), each cell's row divided by its sum."""
    mean = _decoded_means(module, latent, onehot)
    return mean / mean.sum(axis=1, keepdims=True)


def _decoded_means(module, latent, onehot):
    """The decoder by hand: [z, batch one-hot] -> (dense, batch norm at its moving statistics,
    ReLU) x 2 -> NB mean exp(log r + logits) (no library size: the fixtures' default)."""
    h = np.concatenate([latent, onehot], axis=1).astype(np.float64)
    stack = module.decoder.stack
    for dense, norm in zip(stack.dense, stack.norms):
        h = h @ dense.kernel.numpy() + dense.bias.numpy()
        h = (h - norm.moving_mean.numpy()) / np.sqrt(norm.moving_variance.numpy() + norm.epsilon)
        h = np.maximum(h * norm.gamma.numpy() + norm.beta.numpy(), 0.0)
    heads = module.decoder.heads
    log_r = np.clip(h @ heads["log_r"].kernel.numpy() + heads["log_r"].bias.numpy(), -10, 10)
    return np.exp(log_r + h @ heads["logits"].kernel.numpy() + heads["logits"].bias.numpy())


def test_normalized_expression_is_the_decoder_mean_at_the_latent(momix):
    adata, module = momix.adata, momix.module
    genes, batches = module.metadata["genes"], list(module.metadata["batch_counts"])
    modelled = adata.obs_names.isin(momix.cells.adata.obs_names)
    latent = momix.get_latent_representation()[modelled]
    own = np.eye(len(batches))[pd.Index(batches).get_indexer(adata.obs["source_dataset"][modelled].astype(str))]

    expression = momix.get_normalized_expression(library_size=1e4)
    assert list(expression.index) == list(adata.obs_names) and list(expression.columns) == genes
    assert expression[~modelled].isna().all().all()                       # left-out cells: NaN, not shifted
    np.testing.assert_allclose(expression[modelled].to_numpy(), 1e4 * _decoded_shares(module, latent, own),
                               rtol=2e-4)
    # Every cell decoded as from one batch: the same hand computation with that batch's one-hot.
    target = batches[1]
    moved = momix.get_normalized_expression(transform_batch=target)
    as_target = np.zeros_like(own)
    as_target[:, 1] = 1.0
    np.testing.assert_allclose(moved[modelled].to_numpy(), _decoded_shares(module, latent, as_target), rtol=2e-4)
    others = (adata.obs["source_dataset"][modelled] != target).to_numpy()
    assert not np.allclose(moved[modelled].to_numpy()[others], expression[modelled].to_numpy()[others] / 1e4)
    # Genes picked by name and order; cells matched by name, whatever order adata has them in.
    picked = momix.get_normalized_expression(gene_list=[genes[5], genes[0]], library_size=1e4)
    pd.testing.assert_frame_equal(picked, expression[[genes[5], genes[0]]])
    reversed_cells = adata[::-1].copy()
    np.testing.assert_allclose(momix.get_normalized_expression(reversed_cells, library_size=1e4).to_numpy(),
                               expression.loc[reversed_cells.obs_names].to_numpy(), rtol=1e-5)
    with pytest.raises(SetupError, match="not trained on.*NOT_A_GENE"):
        momix.get_normalized_expression(gene_list=["NOT_A_GENE"])
    with pytest.raises(SetupError, match="transform_batch='nowhere' is not one of the model's training batches"):
        momix.get_normalized_expression(transform_batch="nowhere")
    with pytest.raises(ValueError, match="library_size must be a positive"):
        momix.get_normalized_expression(library_size=0)


def test_posterior_mixture_is_the_law_the_latent_is_the_mean_of(cells, momix, flat_mixture, plain_vae):
    """q(z|x) as a mixture (what denoised expression draws from) has the reported latent as its
    mean, for every model kind; MoMixVAE in both of its inference modes (the fixture's is scalable)."""
    models = {"momix": momix, "mixture": flat_mixture, "vae": plain_vae}
    for cls, options in [(sh.IndMoMVAE, {}), (sh.TreeVAE, {}), (sh.MoMixVAE, {"inference": "exact"})]:
        adata = cells.copy()
        cls.setup_anndata(adata, layer="counts", batch_key="source_dataset",
                          levels=["level_1", "level_2", "level_3", "level_4"])
        models[cls.__name__] = cls(adata, **TINY, **options).train(**TRAIN)
    for name, model in models.items():
        adata, X, covariates, rows = model._cells_of(None)
        log_q, loc, scale = (t.numpy() for t in model.module.posterior_mixture(
            np.asarray(X.todense() if sp.issparse(X) else X, np.float32), covariates))
        assert log_q.shape == loc.shape[:2] and loc.shape == scale.shape and (scale > 0).all(), name
        np.testing.assert_allclose(np.exp(log_q).sum(axis=1), 1.0, rtol=1e-5, err_msg=name)
        mean = np.einsum("bk,bkd->bd", np.exp(log_q), loc)
        np.testing.assert_allclose(mean, model.get_latent_representation()[rows], rtol=1e-4, atol=1e-5, err_msg=name)
        # Denoised expression from draws stays with its own cell (the plain VAE decodes them flattened).
        drawn = model.get_normalized_expression(n_samples=50).to_numpy()[rows]
        at_mean = model.get_normalized_expression().to_numpy()[rows]
        shuffled = at_mean[np.random.default_rng(0).permutation(len(rows))]
        assert np.abs(drawn - at_mean).mean() < 0.5 * np.abs(drawn - shuffled).mean(), name


def test_latent_draws_follow_the_mixture():
    """draw_latent against the law it draws from: two far-apart components weighted 0.3 / 0.7."""
    from scvae_hier.models.mixture import draw_latent
    log_q = np.log([[0.3, 0.7]], dtype=np.float32)
    loc = np.array([[[-5.0, 1.0], [5.0, 2.0]]], np.float32)
    scale = np.array([[[0.5, 1.5], [1.0, 0.25]]], np.float32)              # never across z_0 = 0
    z = draw_latent(log_q, loc, scale, 20000, np.array([4, 0], np.int64)).numpy()[0]
    first = z[:, 0] < 0
    assert abs(first.mean() - 0.3) < 0.015                                   # 5 standard errors
    for k, cells_of_k in enumerate([first, ~first]):
        np.testing.assert_allclose(z[cells_of_k].mean(axis=0), loc[0, k], atol=0.05)
        np.testing.assert_allclose(z[cells_of_k].std(axis=0), scale[0, k], rtol=0.03)
    again = draw_latent(log_q, loc, scale, 20000, np.array([4, 0], np.int64)).numpy()[0]
    np.testing.assert_array_equal(z, again)                                   # stateless: seeded


def test_normalized_expression_averages_the_decoder_over_posterior_draws(momix):
    """n_samples=S: the shares averaged over z ~ q(z|x), against the decoder by hand on draws made
    here with numpy (y ~ q(y|x), z ~ N(loc_y, scale_y)): they agree within the Monte Carlo noise,
    which is well below how far the latent-mean decode lies from both."""
    module = momix.module
    adata, X, covariates, rows = momix._cells_of(None)
    log_q, loc, scale = (t.numpy().astype(np.float64) for t in module.posterior_mixture(
        np.asarray(X.todense() if sp.issparse(X) else X, np.float32), covariates))
    rng = np.random.default_rng(1)
    draws = 1000
    by_hand = np.zeros((len(rows), len(module.metadata["genes"])))
    for _ in range(draws):
        by_hand += _decoded_shares(module, _numpy_draw(log_q, loc, scale, rng), covariates) / draws
    drawn = momix.get_normalized_expression(n_samples=draws, seed=2).to_numpy()[rows]
    at_mean = momix.get_normalized_expression().to_numpy()[rows]
    monte_carlo = np.abs(drawn - by_hand).mean()
    assert monte_carlo < 0.2 * np.abs(at_mean - by_hand).mean()
    np.testing.assert_allclose(drawn.sum(axis=1), 1.0, rtol=1e-4)
    assert np.array_equal(momix.get_normalized_expression(n_samples=draws, seed=2).to_numpy()[rows], drawn)
    assert not np.array_equal(momix.get_normalized_expression(n_samples=draws, seed=3).to_numpy()[rows], drawn)
    with pytest.raises(ValueError, match="n_samples must be None"):
        momix.get_normalized_expression(n_samples=0)


def test_differential_expression_compares_a_node_with_its_siblings(momix):
    """Groups by the hierarchy (siblings by default, a coarse node taking the cells under it),
    counted by hand; raw means by hand; each group's mean share against the denoised expression
    averaged over its cells (an independent path through get_normalized_expression)."""
    adata = momix.adata
    _, X, _, rows = momix._cells_of(None)
    counts = X.toarray() if sp.issparse(X) else np.asarray(X)
    obs = adata.obs.iloc[rows]
    cd8, cd4 = (obs["level_3"] == "CD8 T").to_numpy(), (obs["level_3"] == "CD4 T").to_numpy()
    de = momix.differential_expression("level_3", "CD8 T")
    genes = momix.module.metadata["genes"]
    assert sorted(de.index) == sorted(genes) and (de["group2"] == "CD4 T").all()
    assert de.attrs == {"cells1": cd8.sum(), "cells2": cd4.sum()}
    np.testing.assert_allclose(de.loc[genes, "raw_mean1"], counts[cd8].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(de.loc[genes, "non_zeros_proportion2"], (counts[cd4] > 0).mean(axis=0), rtol=1e-6)
    expression = momix.get_normalized_expression(n_samples=20).to_numpy()[rows]
    apart = np.abs(expression[cd8].mean(axis=0) - expression[cd4].mean(axis=0)).sum()    # the groups' own gap
    for column, cells in (("scale1", cd8), ("scale2", cd4)):
        reference = expression[cells].mean(axis=0)
        assert np.abs(de.loc[genes, column].to_numpy() - reference).sum() < 0.3 * apart   # measured: 0.06 x
    assert np.array_equal(momix.differential_expression("level_3", "CD8 T")["p_value"], de["p_value"])   # seeded
    # A coarse class on a finer column takes the cells under it; an only child meets its parent's siblings.
    lineage = momix.differential_expression("level_4", "T cell", n_replicates=20)
    t_cells = (obs["level_2"] == "T cell").to_numpy()
    others = obs["level_2"].isin(["B cell", "NK cell", "Monocyte"]).to_numpy()
    assert lineage.attrs == {"cells1": t_cells.sum(), "cells2": others.sum()}
    assert set(lineage["group2"].iloc[0].split(", ")) == {"B cell", "NK cell", "Monocyte"}
    b_cells = momix.differential_expression("level_4", "CD19+ B", n_replicates=20)
    assert set(b_cells["group2"].iloc[0].split(", ")) == {"NK cell", "T cell", "Monocyte"}
    few = momix.differential_expression("level_3", "CD8 T", max_cells=10, n_replicates=20)
    assert few.attrs == de.attrs and not np.allclose(few.loc[genes, "scale1"], de.loc[genes, "scale1"])
    rest = momix.differential_expression("level_4", "CD19+ B", group2="rest", n_replicates=20)
    assert rest.attrs["cells2"] == len(rows) - rest.attrs["cells1"]
    with pytest.raises(SetupError, match="'nowhere' is not a column of adata.obs"):
        momix.differential_expression("nowhere", "CD8 T")
    with pytest.raises(SetupError, match=r"group1 \['Neuron'\] matches no value"):
        momix.differential_expression("level_3", "Neuron")
    with pytest.raises(SetupError, match="share .* cells; a cell can be in one group only"):
        momix.differential_expression("level_4", "T cell", group2="CD8 T")
    with pytest.raises(ValueError, match="n_draws must be a whole number"):
        momix.differential_expression("level_3", "CD8 T", n_draws=0)


def test_hierarchy_markers_list_each_splitting_node_once(momix):
    """Every class that splits from its siblings, once (a class alone under its parent is its
    parent's cells), coarse to fine; each node's genes are differential_expression's calls, up in
    the node, largest fold change first; the default reads the model's own predictions."""
    # The test model trains for 2 epochs: small fold changes count here (delta 0.02).
    table = momix.hierarchy_markers(groupby="level_4", n_genes=3, n_replicates=50, delta=0.02)
    hierarchy = momix.hierarchy
    nodes = list(dict.fromkeys(table["node"]))
    assert all(momix.hierarchy.siblings([node]) for node in nodes) and {"T cell", "CD8 T"} <= set(nodes)
    assert (table.groupby("node")["level"].nunique() == 1).all()            # each node listed once
    # The same cells under several names (Stem = CD34 HSC = CD34+; B cell = CD19+ B) count once.
    assert len({"Stem", "CD34 HSC", "CD34+"} & set(nodes)) <= 1 and len({"B cell", "CD19+ B"} & set(nodes)) <= 1
    assert (table.groupby("node")["rank"].max() <= 3).all()
    for node in ("T cell", "CD8 T"):
        de = momix.differential_expression("level_4", node, n_replicates=50, delta=0.02)
        calls = de[de["is_de_fdr"] & (de["lfc_mean"] > 0)].sort_values("lfc_mean", ascending=False)
        assert list(table.loc[table["node"] == node, "gene"]) == list(calls.index[:3])
    own = momix.hierarchy_markers(n_genes=2, n_replicates=20, delta=0.02)
    assert len(own) and set(own["node"]) <= set(sum((hierarchy.classes(l) for l in range(4)), []))
    joined = momix.adata.copy()                                  # the same as naming the predictions joined
    joined.obs = joined.obs.drop(columns=[c for c in joined.obs if c.startswith("scvae_")]).join(momix.predict_levels())
    pd.testing.assert_frame_equal(own, momix.hierarchy_markers(joined, groupby="scvae_level_4", n_genes=2,
                                                               n_replicates=20, delta=0.02))
    with pytest.raises(SetupError, match="'nowhere' is not a column"):
        momix.hierarchy_markers(groupby="nowhere")


def test_elbo_and_marginal_likelihood_bound_the_same_quantity(momix):
    adata = momix.adata
    modelled = adata.obs_names.isin(momix.cells.adata.obs_names)
    elbo = momix.get_elbo(return_mean=False)
    assert elbo.shape == (adata.n_obs,) and np.isnan(elbo[~modelled]).all() and np.isfinite(elbo[modelled]).all()
    assert momix.get_elbo() == pytest.approx(elbo[modelled].mean())
    assert (elbo[modelled] < 0).all()                                     # a log-probability of counts
    # The importance-weighted bound sums the clusters out of q too, so even one draw is at least
    # the ELBO (up to its noise, a fraction of a nat over 540 cells), and more draws tighten it.
    one_draw = momix.get_marginal_ll(n_samples=1)
    many = momix.get_marginal_ll(n_samples=200, return_mean=False)
    assert np.isnan(many[~modelled]).all()
    assert elbo[modelled].mean() - 0.5 < one_draw < many[modelled].mean() - 1.0
    assert momix.get_marginal_ll(n_samples=200) == pytest.approx(many[modelled].mean())   # seeded
    with pytest.raises(ValueError, match="n_samples must be a whole number"):
        momix.get_marginal_ll(n_samples=0)


def test_marginal_likelihood_with_one_draw_is_the_elbo_of_a_plain_vae(plain_vae):
    """Without discrete variables the one-draw importance weight is the ELBO's integrand: both
    estimate the same number (about -115 nats a cell here; one draw moves the mean by about a
    nat, so eight seeds are averaged), which a per-count or negated ELBO would not."""
    model = plain_vae
    elbo = model.get_elbo()
    one_draw = np.mean([model.get_marginal_ll(n_samples=1, seed=seed) for seed in range(8)])
    assert abs(one_draw - elbo) < 1.5 and model.get_marginal_ll(n_samples=200) > elbo + 5.0
    with pytest.raises(SetupError, match="transform_batch= was given, but the model was trained without a batch"):
        model.get_normalized_expression(transform_batch="MUDAN")


def test_flat_mixture_names_nest_in_the_hierarchy(flat_mixture):
    model = flat_mixture
    levels = model.predict_levels().dropna()
    paths = {tuple(p) for p in model.hierarchy.paths.values()}
    named = levels[~levels["scvae_level_4"].astype(str).str.startswith("cluster ")]
    assert len(named) > 0
    for _, row in named.iterrows():
        assert tuple(row[f"scvae_{lv}"] for lv in model.hierarchy.levels) in paths
    # Coarser probabilities sum the clusters under the name, so they never fall below the finest one.
    assert (named["scvae_level_1_probability"] >= named["scvae_level_4_probability"] - 1e-6).all()
    # Its prior samples cells of a node (the components named under it; the prior layer's
    # attribute once hid the method this needs).
    node = str(named["scvae_level_2"].iloc[0])
    sample = model.sample(n=20, node=node, seed=0)
    assert sample.n_obs == 20 and (sample.obs["node"] == node).all() and sample.X.sum() > 0


def test_class_probabilities_are_the_posterior_summed_by_name(momix, flat_mixture, plain_vae):
    """predict_probabilities: rows sum to 1, predict_levels' call has its column's probability (and
    is the largest where the model calls each level's argmax); a flat model's coarse classes sum its
    clusters under them (by hand from the hierarchy's paths)."""
    for model in (momix, flat_mixture):
        assert model.temperature is None                 # trained without labels: read as they are
        calls = model.predict_levels(keep_labels=False)
        modelled = calls["scvae_level_4"].notna().to_numpy()
        for level in model.hierarchy.levels:
            soft = model.predict_probabilities(level=level)
            assert soft.index.equals(model.adata.obs_names) and soft[~modelled].isna().all().all()
            soft = soft[modelled]
            np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
            called = calls.loc[modelled, f"scvae_{level}"].astype(str).to_numpy()
            column = soft.columns.get_indexer(called)
            assert (column >= 0).all()
            np.testing.assert_allclose(soft.to_numpy()[np.arange(len(called)), column],
                                       calls.loc[modelled, f"scvae_{level}_probability"], rtol=1e-5)
            # MoMixVAE calls each level's argmax; the flat model the ancestors of its argmax cluster.
            if model is momix or level == model.hierarchy.levels[-1]:
                np.testing.assert_array_equal(soft.idxmax(axis=1).to_numpy(), called)
    finest = flat_mixture.predict_probabilities()                        # one column per cluster
    assert finest.shape[1] == len(flat_mixture.module.metadata["cluster_names"]["level_4"])
    for i, level in enumerate(flat_mixture.hierarchy.levels[:-1]):
        soft = flat_mixture.predict_probabilities(level=i)
        ancestor = {path[-1]: path[i] for path in flat_mixture.hierarchy.paths.values()}
        for name in soft.columns:
            under = [c for c in finest.columns if ancestor.get(c, c) == name]
            np.testing.assert_allclose(soft[name], finest[under].sum(axis=1), atol=1e-6, err_msg=name)
    assert momix.predict_probabilities(level=-1).equals(momix.predict_probabilities(level="level_4"))
    for bad in ("level_9", 4, 1.5, True):
        with pytest.raises(ValueError, match="level"):
            momix.predict_probabilities(level=bad)
    with pytest.raises(RuntimeError, match="no clusters"):
        plain_vae.predict_probabilities()


def test_command_line_trains_the_same_model(momix, cells, tmp_path):
    """The CLI is a client of the same pieces: equal settings give bit-identical latents."""
    run, path = tmp_path / "run", tmp_path / "user.h5ad"
    cells.write_h5ad(path)
    assert main(["train", str(path), "--model", "momix", "--layer", "counts", "--output", str(run),
                 "--levels", "level_1", "level_2", "level_3", "level_4", "--batch-key", "source_dataset",
                 "--n-genes", "80", "--latent-dim", "3", "--hidden", "16", "16", "--drop-empty-cells",
                 "--epochs", "2", "--warm-up", "1", "--batch-size", "64", "--no-xla"]) == 0
    outputs = anndata.read_h5ad(run / "outputs.h5ad")
    latent = pd.DataFrame(momix.get_latent_representation(), index=momix.adata.obs_names)
    np.testing.assert_array_equal(latent.loc[outputs.obs_names].to_numpy(), outputs.obsm["X_scvae"])
    loaded = sh.load(run)
    assert loaded.module.metadata["cluster_names"] == momix.module.metadata["cluster_names"]
    # `scvae-hier markers` on the file gives the API's table (the same model, cells and seeds).
    table = tmp_path / "markers.csv"
    assert main(["markers", str(run), str(path), "--output", str(table), "--groupby", "level_4", "--n-genes", "3",
                 "--delta", "0.02"]) == 0
    expected = momix.hierarchy_markers(groupby="level_4", n_genes=3, delta=0.02)
    assert len(expected) > 10
    pd.testing.assert_frame_equal(pd.read_csv(table), expected.reset_index(drop=True), check_dtype=False)
    assert main(["markers", str(run), str(path), "--output", str(tmp_path / "markers.txt")]) == 2
    # `scvae-hier annotate` reads a model trained on a layer from that layer of the file (it raised
    # KeyError 'counts' before 2026-12-06); the API names a missing layer.
    assert main(["annotate", str(run), str(path), "--output", str(tmp_path / "annotated.h5ad")]) == 0
    annotated = anndata.read_h5ad(tmp_path / "annotated.h5ad")
    np.testing.assert_array_equal(annotated.obs["scvae_level_4"].astype(str).to_numpy(),
                                  momix.predict_levels(cells)["scvae_level_4"].astype(str).to_numpy())
    with pytest.raises(DataError, match="adata has no layer 'counts'"):
        momix.get_latent_representation(anndata.AnnData(cells.layers["counts"], obs=cells.obs, var=cells.var))


def test_a_query_missing_genes_is_refused_unless_padded_with_zeros(momix, cells, tmp_path):
    """A query without 5 of the model's genes is refused, naming them and the way out; padded
    (prepare_query_anndata, or `annotate --missing-genes zeros`) it reads exactly as the full
    query with those genes' counts set to zero, which is what the padding claims to be."""
    from scvae_hier.annotation import MissingGenesWarning

    genes = list(momix.module.metadata["genes"])
    dropped = genes[3:8]
    query = cells[:, ~cells.var_names.isin(dropped)].copy()
    with pytest.raises(DataError, match=r"5 of the 80 required genes are missing.*prepare_query_anndata"):
        momix.predict_levels(query)
    with pytest.warns(MissingGenesWarning, match="5 of the model's 80 genes are missing") as warned:
        padded = sh.prepare_query_anndata(query, momix)
    expected = np.nanmean(momix.get_normalized_expression(padded, gene_list=dropped).to_numpy().sum(axis=1))
    assert 0 < expected < 1 and f"The model expects {expected:.0%} of these cells' counts on them" in str(warned[0].message)
    assert padded.n_vars == query.n_vars + 5 and padded.var["missing_from_query"].sum() == 5
    assert padded.layers["counts"][:, padded.var_names.isin(dropped)].nnz == 0
    zeroed = cells.copy()
    counts = zeroed.layers["counts"].tolil()
    counts[:, np.flatnonzero(zeroed.var_names.isin(dropped))] = 0
    zeroed.layers["counts"] = counts.tocsr()
    assert zeroed.layers["counts"].sum() < cells.layers["counts"].sum()          # the genes were expressed
    np.testing.assert_array_equal(momix.get_latent_representation(padded), momix.get_latent_representation(zeroed))
    assert not np.array_equal(momix.get_latent_representation(padded), momix.get_latent_representation(cells))
    assert sh.prepare_query_anndata(cells, momix) is cells                       # nothing missing: as given
    renamed = cells.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(DataError, match="shares none of the model's 80 genes"):
        sh.prepare_query_anndata(renamed, momix)
    # The command line: refused by default, padded when asked, the added genes recorded.
    model_folder, path = tmp_path / "model", tmp_path / "query.h5ad"
    momix.save(model_folder)
    query.write_h5ad(path)
    assert main(["annotate", str(model_folder), str(path), "--output", str(tmp_path / "refused.h5ad")]) == 2
    with pytest.warns(MissingGenesWarning):
        assert main(["annotate", str(model_folder), str(path), "--output", str(tmp_path / "padded.h5ad"),
                     "--missing-genes", "zeros"]) == 0
    annotated = anndata.read_h5ad(tmp_path / "padded.h5ad")
    assert sorted(annotated.uns["scvae_annotation"]["genes_added_as_zeros"]) == sorted(dropped)
    np.testing.assert_array_equal(annotated.obs["scvae_level_4"].astype(str).to_numpy(),
                                  momix.predict_levels(zeroed)["scvae_level_4"].astype(str).to_numpy())


def test_posterior_predictive_counts_follow_the_decoder_at_posterior_draws(momix):
    """Counts drawn for each cell average, per gene, to the NB mean of the decoder (by hand in
    numpy) at latents drawn from q(z|x) with numpy: within 10% on every gene expected above 0.5
    counts, over 30 cells x 400 draws; they are whole numbers, seeded, NaN for cells left out."""
    module = momix.module
    adata, X, covariates, rows = momix._cells_of(None)
    cells = np.arange(30)
    log_q, loc, scale = (t.numpy().astype(np.float64) for t in module.posterior_mixture(
        np.asarray(X[cells].todense(), np.float32), covariates[cells]))
    rng = np.random.default_rng(5)
    by_hand = np.zeros(X.shape[1])
    draws = 400
    for _ in range(draws):
        by_hand += _decoded_means(module, _numpy_draw(log_q, loc, scale, rng), covariates[cells]).mean(axis=0) / draws
    drawn = momix.posterior_predictive_sample(n_samples=draws, seed=1)
    assert drawn.shape == (adata.n_obs, X.shape[1], draws)
    modelled = np.zeros(adata.n_obs, bool)
    modelled[rows] = True
    assert np.isnan(drawn[~modelled]).all() and not np.isnan(drawn[modelled]).any()
    ours = drawn[rows[cells]]
    assert (ours >= 0).all() and (ours == np.round(ours)).all()
    sampled = ours.mean(axis=(0, 2))
    expressed = by_hand > 0.5
    assert expressed.sum() >= 10
    np.testing.assert_allclose(sampled[expressed], by_hand[expressed], rtol=0.1)
    two = list(module.metadata["genes"][:2])
    one = momix.posterior_predictive_sample(gene_list=two, seed=2)
    assert one.shape == (adata.n_obs, 2)
    assert np.array_equal(one, momix.posterior_predictive_sample(gene_list=two, seed=2), equal_nan=True)
    with pytest.raises(ValueError, match="n_samples must be a whole number"):
        momix.posterior_predictive_sample(n_samples=0)
