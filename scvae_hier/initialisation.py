"""PCA + k-means initialisation of the prior components (the poster's recipe).

Counts are library-size normalised and log1p-transformed, projected on their first D principal
components (scaled to unit overall variance, the scale of a N(0, I) latent), and clustered by
k-means once per number of components the model asks for. Component means start at the
centres and scales at the within-cluster spread; the assignments of consecutive levels also give
MoMixVAE its starting transitions.
"""
import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA


def pca_scores(X, latent_dim: int, seed: int = 0, max_cells: int = 5000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(X.shape[0], min(max_cells, X.shape[0]), replace=False))
    counts = X[rows].toarray() if hasattr(X, "toarray") else np.asarray(X[rows])
    totals = counts.sum(axis=1, keepdims=True)
    logged = np.log1p(counts / np.maximum(totals, 1.0) * np.median(totals))
    n_components = min(latent_dim, *logged.shape)
    scores = PCA(n_components=n_components, random_state=seed).fit_transform(logged)
    scores = scores / scores.std()
    if n_components < latent_dim:  # fewer genes or cells than latent dimensions: pad with zeros
        scores = np.pad(scores, ((0, 0), (0, latent_dim - n_components)))
    return scores


def kmeans_moments(scores: np.ndarray, n_clusters: int, seed: int = 0):
    """Centres [K, D], within-cluster scales [K, D] and assignments of k-means on the scores."""
    fit = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit(scores)
    scales = np.ones_like(fit.cluster_centers_)
    for k in range(n_clusters):
        members = scores[fit.labels_ == k]
        if len(members) > 1:
            scales[k] = members.std(axis=0)
    return fit.cluster_centers_, np.clip(scales, 0.05, None), fit.labels_


def initialise_prior(model, X, seed: int = 0) -> None:
    """Set the model's prior components from PCA + k-means on counts X (cells x genes)."""
    scores = pca_scores(X, model.latent_dim, seed)
    model.initialise_prior({k: kmeans_moments(scores, k, seed) for k in model.prior_sizes()})
