"""Differential expression's numbers (`scvae_hier.differential`) against independent computations:
fold changes, probabilities and p-values in closed form for normal replicates, Benjamini-Hochberg
by its definition, the resampled means' spread by the bootstrap's formula, and no genes called
between two samples of one mixed population (what scVI's pairs of single cells get wrong)."""
import math

import numpy as np
import pytest

from scvae_hier.differential import change_test, log_shares, resampled_means


def phi_tail(x):
    """P(N(0, 1) > x), written with math.erfc (independent of scipy)."""
    return 0.5 * math.erfc(x / math.sqrt(2))


def test_fold_changes_probabilities_and_p_values_match_the_closed_form():
    """Replicates of log2 means N(mu_g, s^2) in each group: LFC ~ N(d_g, 2 s^2), P(|LFC| > delta)
    = tail(-(delta + d) / sd) + tail((delta - d) / sd), and the p-value of |LFC| <= delta is the
    normal tail beyond delta at the replicates' mean and sd."""
    rng = np.random.default_rng(0)
    replicates, s, delta = 200_000, 0.2, 0.25
    d = np.array([0.0, 2.0, -0.4])                               # unchanged, 4-fold up, 0.76-fold
    group2 = -10 + s * rng.standard_normal((replicates, 3))
    group1 = -10 + d + s * rng.standard_normal((replicates, 3))
    table = change_test(group1, group2, ["a", "b", "c"], delta=delta)
    sd = s * math.sqrt(2)
    for gene, shift in zip("abc", d):
        expected = phi_tail((delta - shift) / sd) + phi_tail((delta + shift) / sd)
        assert table.loc[gene, "proba_de"] == pytest.approx(expected, abs=0.005), gene
        assert table.loc[gene, "lfc_mean"] == pytest.approx(shift, abs=0.005), gene
        assert table.loc[gene, "lfc_median"] == pytest.approx(shift, abs=0.005), gene
        assert table.loc[gene, "lfc_std"] == pytest.approx(sd, rel=0.01), gene
        row = table.loc[gene]
        assert row["p_value"] == pytest.approx(phi_tail((abs(row["lfc_mean"]) - delta) / row["lfc_std"]), rel=1e-9)
        odds = row["proba_de"] / (1 - row["proba_de"]) if 0 < row["proba_de"] < 1 else None
        if odds is not None:
            assert row["bayes_factor"] == pytest.approx(math.log(odds))
    assert list(table.index) == ["b", "c", "a"]                   # smallest p-value first
    assert table.loc["b", "is_de_fdr"] and not table.loc["a", "is_de_fdr"]


def test_genes_called_are_benjamini_hochbergs():
    """By the definition: with p-values sorted, reject the k smallest for the largest k with
    p_(k) <= k q / m."""
    rng = np.random.default_rng(1)
    for trial in range(30):
        genes = [f"g{i}" for i in range(40)]
        shift = np.where(rng.random(40) < 0.3, rng.normal(0, 1.5, 40), 0.0)
        group1 = shift + 0.3 * rng.standard_normal((300, 40))
        group2 = 0.3 * rng.standard_normal((300, 40))
        for q in (0.01, 0.05, 0.2):
            table = change_test(group1, group2, genes, fdr_target=q)
            p = np.sort(table["p_value"].to_numpy())
            passing = [k for k in range(1, 41) if p[k - 1] <= k * q / 40]
            k = max(passing) if passing else 0
            assert table["is_de_fdr"].sum() == k, (trial, q)
            assert table["is_de_fdr"].to_numpy()[:k].all()          # sorted by p-value: the first k


def test_resampled_means_spread_as_the_bootstrap_formula_says():
    """Each replicate is the mean of n picks, each uniform over the group's (cell, draw) entries:
    its mean is the grand mean and its variance the entries' variance over n."""
    rng = np.random.default_rng(2)
    values = rng.gamma(2.0, 1.0, size=(300, 4, 3)) * np.array([1.0, 5.0, 0.1])
    means = resampled_means(values, 20_000, np.random.default_rng(3))
    flat = values.reshape(-1, 3)
    np.testing.assert_allclose(means.mean(axis=0), flat.mean(axis=0), rtol=0.005)
    np.testing.assert_allclose(means.std(axis=0), flat.std(axis=0) / math.sqrt(300), rtol=0.03)


def test_two_samples_of_one_mixed_population_call_no_gene_and_a_real_change_is_called():
    """Three lineages far apart in 200 genes' log expression, mixed 50 / 30 / 20; two groups of
    300 cells drawn from that same mixture differ only by sampling, so nothing may be called;
    a gene raised 4-fold in every cell of group 1 must be."""
    rng = np.random.default_rng(4)
    lineage_means = rng.normal(-14, 3, size=(3, 200))
    called = []
    for seed in range(5):
        rng = np.random.default_rng(10 + seed)
        groups = []
        for _ in range(2):
            kinds = rng.choice(3, size=300, p=[0.5, 0.3, 0.2])
            log2_share = lineage_means[kinds][:, None] + 0.5 * rng.standard_normal((300, 4, 200))
            groups.append(np.exp2(log2_share))
        groups[0][:, :, 0] *= 4.0
        means = [resampled_means(log_shares(g), 200, rng) for g in groups]
        table = change_test(means[0], means[1], [f"g{i}" for i in range(200)])
        called.append(set(table.index[table["is_de_fdr"]]))
    assert all(c == {"g0"} for c in called), called


def test_bad_arguments_are_named():
    means = np.zeros((4, 2))
    with pytest.raises(ValueError, match="one shape with 3 genes"):
        change_test(means, means, ["a", "b", "c"])
    with pytest.raises(ValueError, match="delta must be a positive"):
        change_test(means, means, ["a", "b"], delta=0)
    with pytest.raises(ValueError, match="fdr_target must be a share"):
        change_test(means, means, ["a", "b"], fdr_target=1.5)
