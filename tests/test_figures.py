"""Figures on a small synthetic run folder, the Hungarian-aligned names, and the neighbour graph of the full data."""
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import silhouette_score

from scvae_hier.analysis.figures import (aligned_names, confusion_matrices, figures_for_run, hierarchy_matrix,
                              latent_embedding, learning_curves, true_vs_predicted)
from scvae_hier.hierarchy import Hierarchy

from conftest import scatter_points

HIERARCHY = Hierarchy("cell_type", ["coarse", "fine"],
                      {"a1": ["A", "A1"], "a2": ["A", "A2"], "b1": ["B", "B1"], "b2": ["B", "B2"]})
N = 300


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's few cores are shared: OpenMP spinning made t-SNE of 300 cells take 15 s."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        yield


def make_adata(hierarchical=False):
    """Four separated blobs; fine clusters 0-3 plus an extra cluster 4 on 15 b2 cells."""
    rng = np.random.default_rng(0)
    leaf = np.repeat(np.arange(4), N // 4)
    centres = rng.normal(scale=10.0, size=(4, 8))
    latent = centres[leaf] + rng.normal(size=(N, 8))
    clusters = np.array([2, 0, 3, 1])[leaf]  # arbitrary ids: 2 <-> A1, 0 <-> A2, 3 <-> B1, 1 <-> B2
    clusters[np.flatnonzero(leaf == 3)[:15]] = 4
    adata = ad.AnnData(np.zeros((N, 3), np.float32),
                       obs=pd.DataFrame({"cell_type": np.array(["a1", "a2", "b1", "b2"])[leaf]},
                                        index=[str(i) for i in range(N)]))
    adata.obsm["X_scvae"] = latent
    adata.obs["split"] = pd.Categorical(np.where(np.arange(N) % 10 == 0, "test", "train"))
    if hierarchical:
        adata.obs["scvae_coarse_cluster"] = pd.Categorical((leaf >= 2).astype(int).astype(str))
        adata.obs["scvae_fine_cluster"] = pd.Categorical(clusters.astype(str))
        adata.obsm["X_scvae_coarse"] = latent[:, :4]
        adata.obsm["X_scvae_fine"] = latent[:, 4:]
    else:
        adata.obs["scvae_cluster"] = pd.Categorical(clusters.astype(str))
    return adata, leaf, clusters


def write_run(folder, hierarchical):
    folder.mkdir()
    adata, _, _ = make_adata(hierarchical)
    adata.write_h5ad(folder / "outputs.h5ad")
    (folder / "config.json").write_text(json.dumps({"hierarchy": HIERARCHY.to_dict()}))
    epochs = np.arange(6)
    history = {"epoch": epochs, "kl_weight": np.minimum(epochs / 3, 1)}
    terms = ["loss", "elbo", "reconstruction", "kl_z", "kl_y"]
    terms += ["marginal_usage", "components_used_coarse", "components_used_fine"] if hierarchical \
        else ["components_used"]
    for term in terms:
        history[term] = np.linspace(1, 2, 6)
        history[f"val_{term}"] = np.linspace(1.1, 2.1, 6)
    pd.DataFrame(history).to_csv(folder / "history.csv", index=False)
    return folder


def assert_png(path):
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def legend_labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_aligned_names_match_classes_and_flag_the_extra_cluster():
    adata, leaf, clusters = make_adata()
    fine = HIERARCHY.level_labels(adata.obs["cell_type"])[:, 1]
    assert aligned_names(fine, clusters) == {0: "A2", 1: "B2", 2: "A1", 3: "B1",
                                             4: "cluster 4 (unmatched)"}
    # String ids (as read from outputs.h5ad) give the same names, in numeric order.
    names = aligned_names(fine, adata.obs["scvae_cluster"])
    assert list(names) == ["0", "1", "2", "3", "4"] and names["4"] == "cluster 4 (unmatched)"
    # Against the coarse level only two clusters can be matched.
    coarse = aligned_names(HIERARCHY.level_labels(adata.obs["cell_type"])[:, 0], clusters)
    assert sorted(v for v in coarse.values() if "unmatched" not in v) == ["A", "B"]
    assert sum("unmatched" in v for v in coarse.values()) == 3


def test_umap_embedding_separates_groups():
    adata, leaf, _ = make_adata()
    embedding = latent_embedding(adata, method="umap", seed=0)
    assert embedding.shape == (N, 2) and np.isfinite(embedding).all()
    assert silhouette_score(embedding, leaf) > 0.5
    assert "X_umap" not in adata.obsm and "neighbors" not in adata.uns  # caller's object untouched


def test_each_figure_shows_its_panels(tmp_path, drawn_figures):
    adata, _, clusters = make_adata()
    embedding = latent_embedding(adata, method="tsne")
    assert embedding.shape == (N, 2)

    assert_png(true_vs_predicted(adata, HIERARCHY, embedding, clusters, tmp_path / "tvp.png"))
    axes = drawn_figures["tvp.png"].axes
    assert [ax.get_title() for ax in axes[:2]] == ["coarse: true classes", "fine: true classes"]
    assert axes[2].get_title().startswith("coarse: predicted clusters (ARI ")
    assert axes[3].get_title().startswith("fine: predicted clusters (ARI ")
    assert len(axes) == 4 and all(scatter_points(ax) == [N] for ax in axes)
    assert legend_labels(axes[1]) == ["A1 (75)", "A2 (75)", "B1 (75)", "B2 (75)"]
    # Predicted clusters carry their matched class names; the extra cluster is named as unmatched.
    assert legend_labels(axes[3]) == ["A1 (75)", "A2 (75)", "B1 (75)", "B2 (60)", "cluster 4 (unmatched) (15)"]

    assert_png(hierarchy_matrix(adata, HIERARCHY, [embedding, embedding], tmp_path / "hm.png", embedded=True))
    axes = drawn_figures["hm.png"].axes
    assert [ax.get_title() for ax in axes] == [
        "coarse row (latent of coarse), coloured by coarse", "coarse row (latent of coarse), coloured by fine",
        "fine row (latent of fine), coloured by coarse", "fine row (latent of fine), coloured by fine"]
    assert all(scatter_points(ax) == [N] for ax in axes)
    assert [ax.get_legend() is not None for ax in axes] == [False, False, True, True]  # under the last row

    assert_png(confusion_matrices(HIERARCHY, adata.obs["cell_type"], [clusters % 2, clusters], tmp_path / "cm.png"))
    axes = drawn_figures["cm.png"].axes
    assert [ax.images[0].get_array().shape for ax in axes] == [(2, 2), (4, 5)]  # classes x clusters
    assert [sum(int(t.get_text()) for t in ax.texts) for ax in axes] == [N, N]
    assert [t.get_text() for t in axes[1].get_xticklabels()][-1] == "4*"  # the unmatched cluster, last

    run = write_run(tmp_path / "run", hierarchical=True)
    assert_png(learning_curves(run / "history.csv", tmp_path / "lc.png"))
    panels = [ax for ax in drawn_figures["lc.png"].axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["elbo", "loss", "reconstruction", "kl z", "kl y", "marginal usage",
                                                 "kl weight", "components used"]
    assert [len(ax.get_lines()) for ax in panels] == [2] * 6 + [1, 4]  # train and validation; two levels


@pytest.mark.parametrize("hierarchical", [False, True])
def test_figures_for_run(tmp_path, hierarchical, drawn_figures):
    run = write_run(tmp_path / "run", hierarchical)
    messages = []
    paths = figures_for_run(run, tmp_path / "figs", method="tsne", progress=messages.append)
    assert [p.name for p in paths] == ["true_vs_predicted.png", "hierarchy_matrix.png",
                                      "learning_curves.png", "confusion_matrices.png"]
    for p in paths:
        assert_png(p)
    assert sorted(drawn_figures) == sorted(p.name for p in paths)
    assert any("TSNE" in m for m in messages)
    assert all(scatter_points(ax) == [N] for ax in drawn_figures["true_vs_predicted.png"].axes)
    # A hierarchical model's own latent per level gives one row each; a flat model's, one row.
    matrix = drawn_figures["hierarchy_matrix.png"].axes
    assert len(matrix) == (4 if hierarchical else 2) and all(scatter_points(ax) == [N] for ax in matrix)
    assert [ax.get_ylabel() for ax in matrix[::2]] == (["X_scvae_coarse", "X_scvae_fine"] if hierarchical
                                                       else ["X_scvae, one latent for every level"])
    panels = [ax.get_title() for ax in drawn_figures["learning_curves.png"].axes if ax.axison]
    assert panels[-1] == "components used"


def test_umap_of_more_than_8192_cells_avoids_the_neighbours_trap(pbmc, monkeypatch):
    """8,391 cells (>= 8192) made scanpy pick pynndescent, whose csr_array lacks getnnz. The trap is
    in the neighbour graph, so the real graph of the real cells is built; only the UMAP layout that
    follows (tens of seconds for 8,391 cells, checked on 300 above) is replaced by a stand-in."""
    import scanpy as sc
    from sklearn.decomposition import TruncatedSVD
    data = pbmc[(pbmc.obs["source_library"] != "cd14_monocytes").to_numpy()]
    assert data.n_obs >= 8192
    counts = data.X[:, :2000].log1p()
    top = np.argsort(-np.asarray(counts.sum(axis=0)).ravel())[:500]
    rep = TruncatedSVD(10, random_state=0).fit_transform(counts[:, top])

    graphs = []

    def layout_of_the_graph(adata, random_state=0, **_):
        graphs.append(adata.obsp["connectivities"])
        adata.obsm["X_umap"] = adata.obsm["rep"][:, :2]

    monkeypatch.setattr(sc.tl, "umap", layout_of_the_graph)
    holder = ad.AnnData(np.zeros((data.n_obs, 0), np.float32), obsm={"X_svd": rep})
    embedding = latent_embedding(holder, key="X_svd", method="umap", seed=0)
    assert embedding.shape == (data.n_obs, 2) and np.isfinite(embedding).all()
    (graph,) = graphs
    assert graph.shape == (data.n_obs, data.n_obs) and graph.nnz >= data.n_obs * 14  # 15 neighbours each
