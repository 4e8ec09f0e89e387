"""Differential expression between two groups of cells from a model's denoised expression.

The log2 fold change of a gene is the difference of the two groups' mean log2 expression shares
(the fold change of their geometric means, as scanpy's `logfoldchanges` reads log-normalised data).
Its uncertainty comes from replicates: each group's mean over its cells resampled with replacement,
each cell contributing one of its draws from the model (z ~ q(z|x), decoded). A gene is called
when the fold change is beyond `delta` in absolute value: the test of "|LFC| <= delta" by the
replicates' normal approximation gives a p-value per gene, and Benjamini-Hochberg across genes
keeps the expected false discovery share within the target.

Measured and dropped (README, "Differential expression"), on random halves of one population,
where nothing should be called: scVI's "change" mode (Boyeau et al. 2019: pairs of single cells,
one from each group, a Bayesian expected-FDR rule) called 19-22 of 500 genes between halves of
PBMC's T cells or non-stem cells, as it measures how cells differ rather than groups; the fold
change of arithmetic means was moved by a few outlier cells (monocyte genes in 10 of 2,700 T
cells, 2 called); the expected-FDR rule on the replicates still called 8 between non-stem halves,
since a share of replicates is not a calibrated probability across hundreds of genes.
numpy, scipy and pandas only; `api.HierarchyModel.differential_expression` draws the shares.
"""
import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, norm

# Added to the shares before the log: one count per 10,000, the pseudocount of scanpy's log1p of
# counts normalised to 10,000, so a fold change reads as on log-normalised data. Measured with
# 0.01 counts per 10,000 instead: genes a group barely expresses (B-cell genes in CD8 T cells,
# shares of 1e-6 against 1e-7, unobservable at these depths) led the lists of T-cell subtypes.
PSEUDOCOUNT = 1e-4


def resampled_means(values, n_replicates, rng) -> np.ndarray:
    """[n_replicates, genes] means of a group's per-cell values (log2 shares here): each replicate
    resamples the group's cells with replacement and takes one of each resampled cell's draws.
    values: [cells, draws, genes]."""
    values = np.asarray(values)
    cells, draws = values.shape[:2]
    means = np.empty((int(n_replicates), values.shape[2]), dtype=np.float64)
    for r in range(int(n_replicates)):
        means[r] = values[rng.integers(cells, size=cells), rng.integers(draws, size=cells)].mean(axis=0)
    return means


def log_shares(shares, pseudocount=PSEUDOCOUNT) -> np.ndarray:
    """log2(share + pseudocount), the scale the fold changes are taken on."""
    return np.log2(np.asarray(shares, np.float64) + pseudocount)


def change_test(log_means1, log_means2, genes, delta=0.25, fdr_target=0.05) -> pd.DataFrame:
    """Per gene, from paired replicates of the two groups' mean log2 shares ([replicates, genes]
    each): the log2 fold change log_means1 - log_means2, its mean, median and sd over replicates,
    the share of replicates with |LFC| > delta (`proba_de`) and its log odds (`bayes_factor`), the
    p-value of "|LFC| <= delta" (`p_value`: the normal tail beyond delta of N(lfc_mean, lfc_std)),
    Benjamini-Hochberg's adjustment (`p_value_adjusted`) and `is_de_fdr` (adjusted <= fdr_target).
    Sorted by p-value, then by |lfc_mean|."""
    log_means1, log_means2 = np.asarray(log_means1, np.float64), np.asarray(log_means2, np.float64)
    if log_means1.shape != log_means2.shape or log_means1.ndim != 2 or log_means1.shape[1] != len(genes):
        raise ValueError(f"log_means1 and log_means2 must be [replicates, genes] of one shape with {len(genes)} "
                         f"genes; got {log_means1.shape} and {log_means2.shape}.")
    if not delta > 0:
        raise ValueError(f"delta must be a positive log2 fold change, got {delta!r}.")
    if not 0 < fdr_target < 1:
        raise ValueError(f"fdr_target must be a share in (0, 1), got {fdr_target!r}.")
    lfc = log_means1 - log_means2
    mean, sd = lfc.mean(axis=0), lfc.std(axis=0)
    proba = (np.abs(lfc) > delta).mean(axis=0)
    odds = np.clip(proba, 1e-8, 1 - 1e-8)
    beyond = np.abs(mean) - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        p_value = np.where(sd > 0, norm.sf(beyond / sd), np.where(beyond > 0, 0.0, 1.0))
    adjusted = false_discovery_control(p_value, method="bh")
    table = pd.DataFrame({
        "lfc_mean": mean,
        "lfc_median": np.median(lfc, axis=0),
        "lfc_std": sd,
        "proba_de": proba,
        "bayes_factor": np.log(odds) - np.log1p(-odds),
        "p_value": p_value,
        "p_value_adjusted": adjusted,
        "is_de_fdr": adjusted <= fdr_target,
    }, index=pd.Index(genes, name="gene"))
    order = np.lexsort((-np.abs(mean), p_value))
    return table.iloc[order]
