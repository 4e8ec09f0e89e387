"""Temperature scaling of the leaf posterior (scvae_hier.calibration), checked against known
temperatures, sums over leaves written out by hand, and the calls it must not change."""
import numpy as np
import pytest

from scvae_hier.calibration import MIN_LABELLED, fit_temperature, level_probabilities, tempered
from scvae_hier.models.supervision import path_predictions
from scvae_hier.tree_shape import leaf_ancestors

PARENTS = [[0, 0, 1], [0, 0, 1, 2, 2]]          # 2 -> 3 -> 5 classes: leaves 0,1 | 2 | 3,4
ANCESTORS = leaf_ancestors(PARENTS, 5)


def _sharpened_cells(n, true_temperature, seed):
    """Leaf probabilities q that are p^(1/T) for the p the labels are drawn from: fitting should
    find T again."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(5, 0.7), size=n)
    leaves = np.array([rng.choice(5, p=row) for row in p])
    return tempered(p, 1.0 / true_temperature), leaves


def test_ancestors_are_the_paths_of_the_leaves():
    np.testing.assert_array_equal(ANCESTORS, [[0, 0, 0, 1, 1], [0, 0, 1, 2, 2], [0, 1, 2, 3, 4]])


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_the_fitted_temperature_undoes_a_known_sharpening(true_temperature):
    q, leaves = _sharpened_cells(4000, true_temperature, seed=0)
    labels = ANCESTORS[:, leaves].T                              # every level labelled
    fitted = fit_temperature(q, ANCESTORS, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.12)


def test_coarse_labels_alone_fit_the_temperature_too():
    """Cells labelled only at level 2 (the others -1): the likelihood of the class sums its leaves."""
    q, leaves = _sharpened_cells(6000, 3.0, seed=1)
    labels = ANCESTORS[:, leaves].T.copy()
    labels[:, 2] = -1
    assert fit_temperature(q, ANCESTORS, labels) == pytest.approx(3.0, rel=0.2)
    # The loss it minimises, by hand for one temperature: -mean log of the leaves under the label.
    t = 2.0
    by_hand = -np.mean([np.log(sum(tempered(q, t)[i, k] for k in range(5) if ANCESTORS[1, k] == labels[i, 1]))
                        for i in range(len(q))])
    under = ANCESTORS[1][None, :] == labels[:, 1][:, None]
    assert -np.log((tempered(q, t) * under).sum(axis=1)).mean() == pytest.approx(by_hand)


def test_too_few_labelled_cells_leave_the_posterior_alone():
    q, leaves = _sharpened_cells(200, 3.0, seed=2)
    labels = np.full((200, 3), -1)
    labels[:MIN_LABELLED - 1] = ANCESTORS[:, leaves[:MIN_LABELLED - 1]].T
    assert fit_temperature(q, ANCESTORS, labels) is None
    labels[MIN_LABELLED - 1] = ANCESTORS[:, leaves[MIN_LABELLED - 1]]
    assert fit_temperature(q, ANCESTORS, labels) is not None


def test_tempering_keeps_the_calls_and_the_levels_nest():
    q, _ = _sharpened_cells(500, 3.0, seed=3)
    for t in (0.5, 1.0, 4.0):
        soft = tempered(q, t)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0)
        np.testing.assert_array_equal(soft.argmax(axis=1), q.argmax(axis=1))
        levels = level_probabilities(soft, ANCESTORS)
        for level, probabilities in enumerate(levels):                  # each class: its leaves summed
            for c in range(probabilities.shape[1]):
                np.testing.assert_allclose(probabilities[:, c], soft[:, ANCESTORS[level] == c].sum(axis=1))
        coarse = np.full((len(q), 3), -1)                                 # and among the leaves labels allow
        coarse[::2, 0] = np.arange(len(q))[::2] % 2
        for labels in (None, coarse):
            before = path_predictions(level_probabilities(q, ANCESTORS), PARENTS, labels)
            after = path_predictions(levels, PARENTS, labels)
            for a, b in zip(before, after):
                np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(tempered(q, 1.0), q, rtol=1e-9)
    # A higher temperature is less sure: the call's probability falls.
    assert (tempered(q, 4.0).max(axis=1) <= tempered(q, 1.0).max(axis=1) + 1e-12).all()
