"""Score TreeVAE tuning runs on their VALIDATION cells only.

    python analyses/tuning/tree/score.py RUN [RUN ...]

Per level: ARI and Hungarian weighted F1 of the model's own nested predictions (every level the
ancestor of the most probable leaf, `path_predictions`), the ARI of the per-level argmax of
q(y_l|x) (not nested by construction), the nesting of both in the model's own tree, hierarchy
consistency after matching, and two references on the same cells: k-means at K_l on the model's
latent, and scanpy's log-normalised PCA (50 components) + k-means at K_l on the counts (leidenalg
is not installed here). One JSON line per run is appended to validation_scores.jsonl.
"""
import json
import sys
from pathlib import Path

import anndata
import numpy as np
import scanpy as sc
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
try:
    from scvae_hier.metrics import hungarian_f1, level_scores
except ImportError:  # earlier layouts of the package
    try:
        from scvae_hier.analysis.metrics import hungarian_f1, level_scores
    except ImportError:
        from analyses.metrics import hungarian_f1, level_scores
from scvae_hier.hierarchy import Hierarchy
from scvae_hier.models.tree import path_predictions

HERE = Path(__file__).resolve().parent


def nesting(predictions, parents):
    """Share of cells whose level-l class lies under their level-(l-1) class, per level l > 1."""
    return [float(np.mean(np.asarray(links)[child] == parent))
            for links, parent, child in zip(parents, predictions, predictions[1:])]


def scanpy_kmeans(adata, sizes, seed=0):
    a = anndata.AnnData(adata.X.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.scale(a, max_value=10)
    sc.tl.pca(a, n_comps=min(50, a.n_vars - 1), random_state=seed)
    return [KMeans(k, n_init=10, random_state=seed).fit_predict(a.obsm["X_pca"]) for k in sizes]


def score(folder: Path, references=True) -> dict:
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    hierarchy = Hierarchy.from_dict(config["hierarchy"])
    parents = config["model_arguments"].get("parents")
    cells = anndata.read_h5ad(folder / "outputs.h5ad")
    cells = cells[(cells.obs["split"] == "validation").to_numpy()].copy()
    labels = cells.obs[hierarchy.label_column].astype(str).to_numpy()
    truth = hierarchy.level_labels(labels)
    probabilities = [cells.obsm[f"scvae_{level}_probabilities"] for level in hierarchy.levels]
    nested = path_predictions(probabilities, parents)
    argmax = [p.argmax(1) for p in probabilities]
    scores = level_scores(hierarchy, labels, [p.astype(str) for p in nested])
    row = {"run": folder.name, "val_elbo": None, "best_epoch": metrics.get("best_epoch"),
           "epochs": metrics.get("epochs_run"), "seconds": metrics.get("seconds"),
           "consistency": float(scores.attrs["hierarchy_consistency"]),
           "nesting": nesting(nested, parents), "nesting_argmax": nesting(argmax, parents)}
    import pandas as pd
    history = pd.read_csv(folder / "history.csv")
    best = metrics.get("best_epoch")
    if best is not None and "val_elbo" in history:
        row["val_elbo"] = round(float(history.loc[history["epoch"] == best, "val_elbo"].iloc[0]), 2)
    for i, level in enumerate(hierarchy.levels):
        row[f"ari_{i + 1}"] = round(float(scores.loc[level, "ari"]), 3)
        row[f"f1w_{i + 1}"] = round(float(scores.loc[level, "f1_weighted"]), 3)
        row[f"argmax_ari_{i + 1}"] = round(float(adjusted_rand_score(truth[:, i], argmax[i])), 3)
        row[f"used_{i + 1}"] = int(len(np.unique(nested[i])))
    if references:
        latent_km = [KMeans(k, n_init=10, random_state=0).fit_predict(cells.obsm["X_scvae"]) for k in hierarchy.sizes]
        scanpy_km = scanpy_kmeans(cells, hierarchy.sizes)
        for i in range(hierarchy.n_levels):
            row[f"latent_kmeans_ari_{i + 1}"] = round(float(adjusted_rand_score(truth[:, i], latent_km[i])), 3)
            row[f"scanpy_kmeans_ari_{i + 1}"] = round(float(adjusted_rand_score(truth[:, i], scanpy_km[i])), 3)
        row["scanpy_kmeans_f1w_last"] = round(float(hungarian_f1(truth[:, -1], scanpy_km[-1])["weighted"]), 3)
    return row


def line(row, n_levels):
    ari = " / ".join(f"{row[f'ari_{l}']:.2f}" for l in range(1, n_levels + 1))
    argmax = " / ".join(f"{row[f'argmax_ari_{l}']:.2f}" for l in range(1, n_levels + 1))
    text = (f"{row['run']:<40} val_elbo {row['val_elbo']}  ARI {ari}  L{n_levels} wF1 {row[f'f1w_{n_levels}']:.2f}  "
            f"nest {min(row['nesting']):.2f} (argmax {min(row['nesting_argmax']):.3f}, ARI {argmax})  "
            f"consistency {row['consistency']:.2f}  epochs {row['epochs']} best {row['best_epoch']} {row['seconds']}s")
    if "latent_kmeans_ari_1" in row:
        km = " / ".join(f"{row[f'latent_kmeans_ari_{l}']:.2f}" for l in range(1, n_levels + 1))
        sk = " / ".join(f"{row[f'scanpy_kmeans_ari_{l}']:.2f}" for l in range(1, n_levels + 1))
        text += f"\n{'':<40} refs: k-means on latent {km}; scanpy PCA+k-means {sk} (L{n_levels} wF1 {row['scanpy_kmeans_f1w_last']:.2f})"
    return text


if __name__ == "__main__":
    for path in sys.argv[1:]:
        folder = Path(path)
        row = score(folder)
        n_levels = sum(1 for k in row if k.startswith("ari_"))
        text = line(row, n_levels)
        print(text)
        with open(HERE / "validation_scores.txt", "a") as handle:
            handle.write(text + "\n")
        with open(HERE / "validation_scores.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
