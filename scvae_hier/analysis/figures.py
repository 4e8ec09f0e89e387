"""Figures of a run (DESIGN §6): true vs predicted labels on a 2-D embedding of the latent, the
latent hierarchy matrix, learning curves and per-level confusion matrices.

Neighbours trap (scanpy 1.11.5, scipy 1.17, pynndescent 0.5.12). `sc.pp.neighbors` with the
default transformer picks an exact sklearn KNeighborsTransformer only while n_obs < 8192 (for the
euclidean metric); from 8192 cells on it uses pynndescent's PyNNDescentTransformer, whose
`transform` returns a `scipy.sparse.csr_array`. scanpy then calls `d.getnnz(axis=1)`, which
exists on the old `csr_matrix` but not on sparse *arrays* in scipy 1.17, so the full data
(8,391 cells) fails with "'csr_array' object has no attribute 'getnnz'" while subsets work.
Workaround: we always pass `transformer="sklearn"` (exact brute-force kNN, a `csr_matrix`); for
~10k cells and a 10-50-D latent it costs seconds and is exact, and nothing global is patched.
constraints.txt pins pynndescent 0.5.13 (2026-12-03), whose sparse matrix scanpy reads, so a
user's plain call works too; the exact neighbours stay here for installs without the pins.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from ..metrics import hungarian_mapping  # noqa: E402

DPI = 120


def latent_embedding(adata, key="X_scvae", method="umap", seed=0, n_neighbors=15):
    """2-D embedding [n, 2] of obsm[key]; UMAP through scanpy (exact kNN, see above) or t-SNE."""
    latent = np.asarray(adata.obsm[key], dtype=np.float32)
    if method == "tsne":
        from sklearn.manifold import TSNE
        perplexity = min(30.0, (latent.shape[0] - 1) / 3.0)
        return TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(latent)
    if method != "umap":
        raise ValueError(f"method must be 'umap' or 'tsne', got {method!r}")
    import anndata as ad
    import scanpy as sc
    # A bare AnnData so the caller's object keeps no neighbour graph or X_umap of ours.
    tmp = ad.AnnData(np.zeros((latent.shape[0], 0), dtype=np.float32), obsm={"rep": latent})
    sc.pp.neighbors(tmp, use_rep="rep", n_neighbors=n_neighbors, transformer="sklearn",
                    random_state=seed)
    sc.tl.umap(tmp, random_state=seed)
    return np.asarray(tmp.obsm["X_umap"])


def _array(values):
    """1-D numpy array; object arrays (pandas strings) become str arrays, as metrics expects."""
    array = np.asarray(values).ravel()
    return array.astype(str) if array.dtype == object else array


def _sorted_ids(values):
    """Cluster ids in numeric order when they are numbers (so '10' follows '9')."""
    ids = list(pd.unique(np.asarray(values).ravel()))
    try:
        return sorted(ids, key=float)
    except (TypeError, ValueError):
        return sorted(ids, key=str)


def aligned_names(true, predicted):
    """Cluster id -> display name: its Hungarian-matched class, or 'cluster k (unmatched)'."""
    true, predicted = _array(true), _array(predicted)
    mapping = hungarian_mapping(true, predicted)
    return {k: str(mapping[k]) if k in mapping else f"cluster {k} (unmatched)"
            for k in _sorted_ids(predicted)}


def _palette(classes, extra=()):
    """Colours for class names (shared by true and matched predicted panels), greys for extras."""
    base = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20").colors
    colours = {c: base[i % len(base)] for i, c in enumerate(classes)}
    greys = plt.get_cmap("Greys")(np.linspace(0.35, 0.85, max(len(extra), 1)))
    colours.update({name: greys[i] for i, name in enumerate(extra)})
    return colours


def _scatter(ax, embedding, names, order, colours, title, seed=0):
    """Scatter coloured by name, drawn in shuffled order so no class hides another."""
    names = np.asarray(names, dtype=object)
    shuffle = np.random.default_rng(seed).permutation(len(names))
    e, n = embedding[shuffle], names[shuffle]
    size = max(1.0, min(12.0, 3000.0 / len(names)))
    ax.scatter(e[:, 0], e[:, 1], s=size, c=[colours[x] for x in n], linewidths=0, rasterized=True)
    counts = pd.Series(n).value_counts()
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[x], label=f"{x} ({counts[x]})")
               for x in order if x in counts.index]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=7,
              frameon=False, ncol=1, handletextpad=0.1, borderaxespad=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _per_level(predicted_by_level, n_levels):
    """One prediction array per level; a single array (a flat model) is reused at every level."""
    if isinstance(predicted_by_level, (list, tuple)):
        if len(predicted_by_level) != n_levels:
            raise ValueError(f"got {len(predicted_by_level)} prediction arrays for {n_levels} levels")
        return [_array(p) for p in predicted_by_level]
    return [_array(predicted_by_level)] * n_levels


def _labels(adata, hierarchy):
    return _array(adata.obs[hierarchy.label_column].astype(str))


def _save(fig, path):
    """Write the figure to `path` and close it; with path None return the open figure (sh.pl)."""
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def true_vs_predicted(adata, hierarchy, embedding, predicted_by_level, path):
    """Figure 2: row 1 true classes per level, row 2 Hungarian-aligned predicted clusters."""
    truth = hierarchy.level_labels(_labels(adata, hierarchy))
    predictions = _per_level(predicted_by_level, hierarchy.n_levels)
    L = hierarchy.n_levels
    fig, axes = plt.subplots(2, L, figsize=(4 * L, 11), squeeze=False, layout="constrained")
    for l, level in enumerate(hierarchy.levels):
        classes = [c for c in hierarchy.classes(l) if c in set(truth[:, l])]
        names = aligned_names(truth[:, l], predictions[l])
        unmatched = [v for v in names.values() if v not in classes]
        colours = _palette(classes, unmatched)
        _scatter(axes[0, l], embedding, truth[:, l], classes, colours, f"{level}: true classes")
        ari = adjusted_rand_score(truth[:, l], predictions[l])
        display = [names[p] for p in predictions[l]]
        _scatter(axes[1, l], embedding, display, classes + unmatched, colours,
                 f"{level}: predicted clusters (ARI {ari:.2f})")
    fig.suptitle("True classes (top) vs predicted clusters, Hungarian-matched to class names (bottom)")
    return _save(fig, path)


def hierarchy_matrix(adata, hierarchy, latents_by_level, path, method="umap", seed=0,
                     row_names=None, embedded=False):
    """Figure 3: row l = latent of level l, column m = coloured by level m's classes.

    latents_by_level: one array per level, or one shared by every level (one row): 2-D embeddings used as they are when `embedded`, else
    representations embedded here (the same array object given for several rows is embedded once).
    row_names: what each row's latent is (default "latent of <level>").
    """
    truth = hierarchy.level_labels(_labels(adata, hierarchy))
    L = hierarchy.n_levels
    R = len(latents_by_level)
    if R not in (1, L):
        raise ValueError(f"got {R} latents for {L} levels; give one per level, or one shared latent")
    row_names = row_names or ([f"latent of {level}" for level in hierarchy.levels] if R == L else ["latent"])
    cache = {}
    embeddings = []
    for latent in latents_by_level:
        if id(latent) not in cache:
            array = np.asarray(latent)
            cache[id(latent)] = array if embedded else latent_embedding(
                _Holder(array), "z", method, seed)
        embeddings.append(cache[id(latent)])
    fig, axes = plt.subplots(R, L, figsize=(3.6 * L, 3.4 * R + 1.5), squeeze=False,
                             layout="constrained")
    for m, level in enumerate(hierarchy.levels):
        classes = [c for c in hierarchy.classes(m) if c in set(truth[:, m])]
        colours = _palette(classes)
        for r in range(R):
            ax = axes[r, m]
            title = (f"{hierarchy.levels[r]} row ({row_names[r]}), coloured by {level}" if R == L
                     else f"coloured by {level}")
            _scatter(ax, embeddings[r], truth[:, m], classes, colours, title)
            if r != R - 1:
                ax.get_legend().remove()  # one legend per column, under the last row
            if m == 0:
                ax.set_ylabel(row_names[r])
    fig.suptitle("Latent hierarchy matrix: rows = latent used for a level, columns = labels of a level")
    return _save(fig, path)


class _Holder:
    """Minimal stand-in with .obsm, so latent_embedding can take a bare array."""

    def __init__(self, latent):
        self.obsm = {"z": latent}


_TERM_ORDER = ["elbo", "loss", "reconstruction", "kl_z", "kl_y", "marginal_usage"]


def learning_curves(history_csv, path):
    """Every term, train and validation, one panel each; kl weight; components used."""
    history = pd.read_csv(history_csv)
    x = history["epoch"] if "epoch" in history else np.arange(len(history))
    columns = [c for c in history.columns if c != "epoch"]
    bases = list(dict.fromkeys(c[4:] if c.startswith("val_") else c for c in columns))
    usage = [b for b in bases if b.startswith("components_used")]
    terms = [b for b in _TERM_ORDER if b in bases]
    terms += [b for b in bases if b not in terms and b not in usage and b != "kl_weight"]
    panels = terms + (["kl_weight"] if "kl_weight" in bases else []) + (["components used"] if usage else [])
    n_cols = 4
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3 * n_rows), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels):
        names = usage if panel == "components used" else [panel]
        for i, name in enumerate(names):
            colour = f"C{i}"
            for column, style, split in ((name, "-", "train"), (f"val_{name}", "--", "validation")):
                if column in history:
                    label = f"{name.replace('components_used_', 'level ')} {split}" if len(names) > 1 else split
                    ax.plot(x, history[column], style, color=colour, label=label)
        ax.set_title(panel.replace("_", " "), fontsize=10)
        ax.set_xlabel("epoch")
        if len(names) > 1:  # many lines: legend beside the panel, not over the curves
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Learning curves ({Path(history_csv).parent.name})")
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrices(hierarchy, labels, predicted_by_level, path):
    """One annotated count heatmap per level: true classes x clusters in Hungarian-match order."""
    truth = hierarchy.level_labels(np.asarray(labels).astype(str))
    predictions = _per_level(predicted_by_level, hierarchy.n_levels)
    L = hierarchy.n_levels
    n_cols = min(L, 2)
    n_rows = -(-L // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(7.5 * n_cols, 5.5 * n_rows), squeeze=False)
    for l, (ax, level) in enumerate(zip(axes.ravel(), hierarchy.levels)):
        classes = [c for c in hierarchy.classes(l) if c in set(truth[:, l])]
        names = aligned_names(truth[:, l], predictions[l])
        matched = {v: k for k, v in names.items() if v in classes}
        clusters = [matched[c] for c in classes if c in matched]
        clusters += [k for k in names if k not in clusters]
        table = pd.crosstab(pd.Categorical(truth[:, l], classes),
                            pd.Categorical(predictions[l], clusters), dropna=False).to_numpy()
        # Colour by the fraction of each true class, so small classes are as visible as big ones.
        fraction = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
        ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if fraction[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(clusters)), [f"{k}*" if names[k] not in classes else str(k)
                                             for k in clusters], fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("cluster (matched order; * unmatched)")
        ax.set_ylabel("true class")
        ax.set_title(f"{level}: ARI {adjusted_rand_score(truth[:, l], predictions[l]):.2f} "
                     f"(counts; colour = fraction of the class)", fontsize=10)
    for ax in axes.ravel()[L:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def figures_for_run(run_folder, out_folder=None, method="umap", progress=print):
    """All figures of a run folder (flat or hierarchical) as PNGs; returns their paths."""
    import json

    import anndata as ad

    from ..hierarchy import Hierarchy
    from ..labels import fill_true_leaf_labels

    run_folder = Path(run_folder)
    out = Path(out_folder) if out_folder is not None else run_folder / "figures"
    config = json.loads((run_folder / "config.json").read_text(encoding="utf-8"))
    if not config.get("hierarchy"):
        raise ValueError(f"{run_folder}/config.json has no hierarchy; the figures compare with one")
    adata = ad.read_h5ad(run_folder / "outputs.h5ad")
    hierarchy = Hierarchy.from_dict(config["hierarchy"])
    truth = fill_true_leaf_labels(adata.obs, hierarchy, config.get("options", {}))
    if not truth.all():  # labels with holes: the figures compare with labels, so they show the labelled cells
        progress(f"{int((~truth).sum())} of {adata.n_obs} cells have no true leaf label; the figures show the "
                 f"other {int(truth.sum())}.")
        adata = adata[truth].copy()
    labels = _labels(adata, hierarchy)
    hierarchy = hierarchy.restrict(labels)
    if "scvae_cluster" in adata.obs:
        predicted = adata.obs["scvae_cluster"].astype(str).to_numpy()
    elif f"scvae_{hierarchy.levels[0]}_cluster" not in adata.obs:
        raise ValueError(f"{run_folder} holds a model without clusters (a plain VAE); the figures compare "
                         f"clusters with labels. Use outputs.h5ad's obsm['X_scvae'] with scanpy instead.")
    else:
        predicted = [adata.obs[f"scvae_{level}_cluster"].astype(str).to_numpy()
                     for level in hierarchy.levels]
    paths = []
    progress(f"{method.upper()} of X_scvae ({adata.n_obs} cells) ...")
    embedding = latent_embedding(adata, "X_scvae", method)
    paths.append(true_vs_predicted(adata, hierarchy, embedding, predicted, out / "true_vs_predicted.png"))
    progress(f"wrote {paths[-1]}")
    # Rows of Figure 3: IndMoMVAE's own latent per level; models with one latent for every level
    # (MixtureVAE, MoMixVAE) get a single row rather than L identical ones.
    keys = [f"X_scvae_{level}" for level in hierarchy.levels]
    if all(k in adata.obsm for k in keys):
        progress(f"{method.upper()} of the {len(keys)} per-level latents ...")
        latents, rows, embedded = [adata.obsm[k] for k in keys], keys, False
    else:
        latents, rows, embedded = [embedding], ["X_scvae, one latent for every level"], True
    paths.append(hierarchy_matrix(adata, hierarchy, latents, out / "hierarchy_matrix.png", method,
                                  row_names=rows, embedded=embedded))
    progress(f"wrote {paths[-1]}")
    if (run_folder / "history.csv").is_file():
        paths.append(learning_curves(run_folder / "history.csv", out / "learning_curves.png"))
    paths.append(confusion_matrices(hierarchy, labels, predicted, out / "confusion_matrices.png"))
    progress(f"wrote {len(paths)} figures to {out}")
    return paths
