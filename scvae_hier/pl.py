"""Plots on the user's AnnData, in scanpy's manner (`sh.pl.levels(adata)`).

They read what the API wrote back into the AnnData: the predictions of `model.predict_levels()`
joined into obs (`scvae_<level>` columns) and a 2-D embedding in obsm (e.g. `sc.pp.neighbors(adata,
use_rep="X_scvae_hier"); sc.tl.umap(adata)` gives obsm["X_umap"]). Each returns the matplotlib
Figure, or writes it to `save` and returns that path.
"""
import numpy as np

from .analysis.figures import _palette, _save, _scatter, hierarchy_matrix as _hierarchy_matrix, plt
from .api import SETUP_KEY
from .hierarchy import Hierarchy
from .labels import label_codes

UNLABELLED_NAME = "unlabelled"  # the true-class panels' name for a cell with no label at a level


def _hierarchy_of(adata, hierarchy):
    if isinstance(hierarchy, Hierarchy):
        return hierarchy
    if hierarchy is not None:
        return Hierarchy.from_file(hierarchy)
    stored = adata.uns.get(SETUP_KEY, {}).get("hierarchy") or adata.uns.get("hierarchy")
    if not stored:
        raise ValueError("No hierarchy: pass hierarchy= (a Hierarchy or a file), or set up the AnnData with "
                         "sh.<Model>.setup_anndata(adata, levels=[...]) first.")
    return Hierarchy.from_dict(dict(stored))


def _true_classes(adata, tree):
    """[cells, levels] each cell's true class per level, "unlabelled" where its labels have a hole
    (the per-level columns of `setup_anndata(levels=...)` when adata has them, else the leaf column;
    a fine label implies its ancestors), as the model was trained on them."""
    setup = adata.uns.get(SETUP_KEY, {})
    columns = setup.get("levels")
    columns = list(columns) if columns is not None and all(c in adata.obs for c in columns) else None
    codes = label_codes(adata.obs, tree, columns, setup.get("unlabelled_category", "Unknown"))
    truth = np.full(codes.shape, UNLABELLED_NAME, dtype=object)
    for i in range(tree.n_levels):
        known = codes[:, i] >= 0
        truth[known, i] = np.asarray(tree.classes(i), dtype=object)[codes[known, i]]
    return truth


def _embedding(adata, basis):
    key = basis if basis in adata.obsm else f"X_{basis}"
    if key not in adata.obsm:
        raise ValueError(f"adata.obsm has no {basis!r}; compute one, e.g. sc.pp.neighbors(adata, "
                         f"use_rep='X_scvae_hier'); sc.tl.umap(adata). obsm has {list(adata.obsm)}.")
    embedding = np.asarray(adata.obsm[key])[:, :2]
    return embedding, key


def levels(adata, hierarchy=None, basis="umap", prefix="scvae_", save=None):
    """Per hierarchy level, the true classes (top row) and the model's predicted class names
    (bottom row) on the embedding obsm[basis]; predicted names share the true classes' colours,
    clusters matched to no class are grey, cells the model left out are not drawn below. Labels with
    holes (as for a semi-supervised model) show as "unlabelled" above; the share that agrees counts
    the cells with a true class at that level that the model was not given the labels of
    (`scvae_labelled` from `predict_levels`: those keep their labels, so they agree by construction)."""
    tree = _hierarchy_of(adata, hierarchy)
    embedding, key = _embedding(adata, basis)
    missing = [f"{prefix}{level}" for level in tree.levels if f"{prefix}{level}" not in adata.obs]
    if missing:
        raise ValueError(f"adata.obs lacks {missing}: join the predictions first, "
                         f"adata.obs = adata.obs.join(model.predict_levels()).")
    truth = _true_classes(adata, tree)
    given = adata.obs[f"{prefix}labelled"].eq(True).to_numpy() if f"{prefix}labelled" in adata.obs \
        else np.zeros(adata.n_obs, bool)             # cells named by the labels they were given
    scope = " labelled cells not given their labels" if given.any() else " labelled"
    fig, axes = plt.subplots(2, tree.n_levels, figsize=(4 * tree.n_levels, 9), squeeze=False, layout="constrained")
    for i, level in enumerate(tree.levels):
        classes = [c for c in tree.classes(i) if c in set(truth[:, i])]
        predicted = adata.obs[f"{prefix}{level}"]
        modelled = predicted.notna().to_numpy()
        names = predicted[modelled].astype(str).to_numpy()
        others = sorted(set(names) - set(classes))
        colours = _palette(classes, others + [UNLABELLED_NAME])
        _scatter(axes[0, i], embedding, truth[:, i], classes + [UNLABELLED_NAME], colours, f"{level}: true classes")
        scored = (truth[modelled, i] != UNLABELLED_NAME) & ~given[modelled]
        agree = (f"{np.mean(names[scored] == truth[modelled, i][scored]):.0%} of {scored.sum()}{scope} agree"
                 if scored.any() else "no check: every labelled cell was given its label")
        _scatter(axes[1, i], embedding[modelled], names, classes + others, colours, f"{level}: predicted ({agree})")
    fig.suptitle(f"True classes (top) and scvae-hier predictions (bottom) on {key}")
    return _save(fig, save)


def hierarchy_matrix(adata, hierarchy=None, basis="umap", save=None):
    """Figure 3 of the poster on the user's AnnData: one embedding, one column per level, each
    coloured by that level's true classes (are coarse classes regions, fine ones sub-regions?)."""
    tree = _hierarchy_of(adata, hierarchy)
    embedding, key = _embedding(adata, basis)
    return _hierarchy_matrix(adata, tree, [embedding], save, embedded=True, row_names=[key])
