"""Per-level clustering metrics against sklearn and hand computations, including K != C."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (accuracy_score, adjusted_mutual_info_score, adjusted_rand_score,
                             f1_score, normalized_mutual_info_score)

from scvae_hier.metrics import (cluster_names, clustering_scores, hierarchy_consistency, hungarian_f1,
                              hungarian_mapping, level_scores, majority_accuracy, write_scores)
from scvae_hier.hierarchy import Hierarchy

# Four clusters, three classes: cluster 3 (one 'a', one 'b') is left unmatched.
MORE_TRUE = np.array(list("aaaabbbbcc"))
MORE_PRED = np.array([0, 0, 0, 3, 1, 1, 1, 3, 2, 2])
# Two clusters, three classes: class 'c' gets no cluster.
FEWER_TRUE = np.array(list("aaabbbc"))
FEWER_PRED = np.array([0, 0, 0, 1, 1, 1, 1])


def mapped_with_sentinel(true, predicted, sentinel="zz-unmatched"):
    mapping = hungarian_mapping(true, predicted)
    assert sentinel not in set(true)
    return np.array([mapping.get(p.item(), sentinel) for p in predicted])


def test_mapping_is_one_to_one_and_leaves_extra_clusters_out():
    assert hungarian_mapping(MORE_TRUE, MORE_PRED) == {0: "a", 1: "b", 2: "c"}
    assert hungarian_mapping(FEWER_TRUE, FEWER_PRED) == {0: "a", 1: "b"}
    # ids of any type; the mapping maximises matches, not per-cluster majorities
    assert hungarian_mapping(list("xxyyy"), ["k1", "k1", "k1", "k2", "k2"]) == {"k1": "x", "k2": "y"}
    assert hungarian_mapping(list("aab"), ["u", "u", "u"]) == {"u": "a"}


def test_cluster_names_keep_only_matches_that_are_the_clusters_own_majority():
    """By hand: u = a a a b, v = a a c, w = b b. The best one-to-one matching (6 cells) is u-a, w-b,
    v-c; v is mostly a, so naming it c would be wrong and it stays unnamed."""
    true, predicted = list("aaab" "aac" "bb"), list("uuuu" "vvv" "ww")
    assert hungarian_mapping(true, predicted) == {"u": "a", "v": "c", "w": "b"}
    assert cluster_names(true, predicted) == {"u": "a", "w": "b"}
    assert cluster_names(list("xxyyy"), ["k1", "k1", "k1", "k2", "k2"]) == {"k1": "x", "k2": "y"}


def test_f1_more_clusters_than_classes_by_hand():
    f1 = hungarian_f1(MORE_TRUE, MORE_PRED)
    # a: tp 3, support 4, predicted 3 -> 6/7; same for b; c: 2 of 2 -> 1
    assert f1["per_class"] == pytest.approx({"a": 6 / 7, "b": 6 / 7, "c": 1.0})
    assert f1["weighted"] == pytest.approx((4 * 6 / 7 + 4 * 6 / 7 + 2 * 1) / 10)
    assert f1["macro"] == pytest.approx((6 / 7 + 6 / 7 + 1) / 3)
    # the unmatched cluster's two cells are wrong, although each holds a real class
    assert f1["accuracy"] == pytest.approx(0.8)
    assert majority_accuracy(MORE_TRUE, MORE_PRED) == pytest.approx(0.9)


def test_labels_from_pandas_object_columns_score_as_numpy_strings():
    # adata.obs[column].to_numpy() gives an object array of Python str: it used to raise AttributeError
    as_objects = pd.Series(MORE_TRUE, dtype=object).to_numpy()
    clusters = pd.Series([f"c{p}" for p in MORE_PRED], dtype=object).to_numpy()
    f1 = hungarian_f1(as_objects, clusters)
    assert f1 == hungarian_f1(np.asarray(MORE_TRUE, dtype=str), np.asarray(clusters, dtype=str))
    assert f1["per_class"] == pytest.approx({"a": 6 / 7, "b": 6 / 7, "c": 1.0})
    assert set(cluster_names(as_objects, clusters)) <= set(clusters)


def test_f1_fewer_clusters_than_classes_by_hand():
    f1 = hungarian_f1(FEWER_TRUE, FEWER_PRED)
    assert f1["per_class"] == pytest.approx({"a": 1.0, "b": 6 / 7, "c": 0.0})
    assert f1["weighted"] == pytest.approx((3 * 1 + 3 * 6 / 7 + 0) / 7)
    assert f1["macro"] == pytest.approx((1 + 6 / 7 + 0) / 3)
    assert f1["accuracy"] == pytest.approx(6 / 7)
    assert majority_accuracy(FEWER_TRUE, FEWER_PRED) == pytest.approx(6 / 7)


def test_majority_accuracy_by_hand():
    true = list("aaabbbbcc")
    pred = [0, 0, 1, 1, 1, 1, 1, 2, 2]  # 0 -> a (2), 1 -> b (4 of 5), 2 -> c (2)
    assert majority_accuracy(true, pred) == pytest.approx(8 / 9)
    # many-to-one: both clusters are called 'a', so everything is a hit
    assert majority_accuracy(list("aaaa"), [0, 0, 1, 1]) == 1.0
    assert hungarian_f1(list("aaaa"), [0, 0, 1, 1])["accuracy"] == 0.5


@pytest.mark.parametrize("seed", range(6))
def test_f1_equals_sklearn_on_mapped_predictions(seed):
    rng = np.random.default_rng(seed)
    n_classes, n_clusters = rng.integers(2, 6), rng.integers(2, 8)
    true = np.array([f"c{i}" for i in rng.integers(0, n_classes, 60)])
    pred = rng.integers(0, n_clusters, 60)
    mapped = mapped_with_sentinel(true, pred)
    classes = sorted(set(true))
    f1 = hungarian_f1(true, pred)
    for average in ("weighted", "macro"):
        assert f1[average] == pytest.approx(
            f1_score(true, mapped, labels=classes, average=average, zero_division=0))
    per_class = f1_score(true, mapped, labels=classes, average=None, zero_division=0)
    assert [f1["per_class"][c] for c in classes] == pytest.approx(per_class)
    assert f1["accuracy"] == pytest.approx(accuracy_score(true, mapped))


def test_sklearn_agreement_when_k_differs_from_c():
    for true, pred in ((MORE_TRUE, MORE_PRED), (FEWER_TRUE, FEWER_PRED)):
        mapped = mapped_with_sentinel(true, pred)
        f1 = hungarian_f1(true, pred)
        assert f1["weighted"] == pytest.approx(
            f1_score(true, mapped, labels=sorted(set(true)), average="weighted", zero_division=0))
        assert f1["macro"] == pytest.approx(
            f1_score(true, mapped, labels=sorted(set(true)), average="macro", zero_division=0))


def test_clustering_scores_match_sklearn():
    s = clustering_scores(MORE_TRUE, MORE_PRED)
    assert s["ari"] == pytest.approx(adjusted_rand_score(MORE_TRUE, MORE_PRED))
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(MORE_TRUE, MORE_PRED))
    assert s["ami"] == pytest.approx(adjusted_mutual_info_score(MORE_TRUE, MORE_PRED))
    assert s["f1_weighted"] == pytest.approx(62 / 70)
    assert s["f1_macro"] == pytest.approx(19 / 21)
    assert (s["accuracy_hungarian"], s["accuracy_majority"]) == pytest.approx((0.8, 0.9))
    assert (s["n_clusters_used"], s["n_classes"]) == (4, 3)
    perfect = clustering_scores(list("aabb"), [7, 7, 3, 3])
    assert perfect["ari"] == perfect["f1_macro"] == perfect["accuracy_hungarian"] == 1.0


def test_inputs_must_line_up():
    with pytest.raises(ValueError, match="length"):
        hungarian_f1(["a", "b"], [0])
    with pytest.raises(ValueError, match="no cells"):
        majority_accuracy([], [])


@pytest.fixture
def tiny():
    """Two levels: X -> {x1, x2}, Y -> {y1}; seven cells."""
    h = Hierarchy("leaf", ["l1", "l2"], {"x1": ("X", "x1"), "x2": ("X", "x2"), "y1": ("Y", "y1")})
    labels = np.array(["x1", "x1", "x2", "x2", "y1", "y1", "y1"])
    # level 1: 0 -> X, 1 -> Y, so cell 3 (an x2) is called Y
    # level 2: 5 -> x1, 6 -> x2, 7 -> y1, cluster 9 (cell 6) is unmatched
    pred = [np.array([0, 0, 0, 1, 1, 1, 1]), np.array([5, 5, 6, 6, 7, 7, 9])]
    return h, labels, pred


def test_hierarchy_consistency_by_hand(tiny):
    h, labels, pred = tiny
    truth = h.level_labels(labels)
    # cell 3 maps to Y / x2 (x2 is not under Y); cell 6's level-2 cluster is unmatched
    assert hierarchy_consistency(h, pred, [truth[:, 0], truth[:, 1]]) == pytest.approx(5 / 7)
    good = [np.array([0, 0, 0, 0, 1, 1, 1]), np.array([5, 5, 6, 6, 7, 7, 7])]
    assert hierarchy_consistency(h, good, [truth[:, 0], truth[:, 1]]) == 1.0
    with pytest.raises(ValueError, match="2 levels"):
        hierarchy_consistency(h, pred[:1], [truth[:, 0]])


def test_level_scores_per_level_and_flat(tiny):
    h, labels, pred = tiny
    truth = h.level_labels(labels)
    df = level_scores(h, labels, pred)
    assert list(df.index) == ["l1", "l2"]
    for l, level in enumerate(h.levels):
        expected = clustering_scores(truth[:, l], pred[l])
        assert df.loc[level].to_dict() == pytest.approx(expected)
    assert df.attrs["hierarchy_consistency"] == pytest.approx(5 / 7)
    # an [n, L] array is read as per-level columns
    stacked = level_scores(h, labels, np.stack(pred, axis=1))
    pd.testing.assert_frame_equal(stacked, df)

    flat = level_scores(h, labels, pred[1])
    assert flat.loc["l1", "ari"] == pytest.approx(adjusted_rand_score(truth[:, 0], pred[1]))
    assert flat.loc["l2", "ari"] == pytest.approx(adjusted_rand_score(truth[:, 1], pred[1]))
    assert flat.loc["l1", "n_clusters_used"] == 4 and flat.loc["l1", "n_classes"] == 2
    assert flat.attrs["hierarchy_consistency"] is None
    with pytest.raises(ValueError, match="7 labels but 6"):
        level_scores(h, labels, pred[1][:6])


def test_write_scores_round_trip(tiny, tmp_path):
    h, labels, pred = tiny
    df = level_scores(h, labels, pred)
    json_path, csv_path = write_scores(df, tmp_path / "out", name="scores")
    assert (json_path.name, csv_path.name) == ("scores.json", "scores.csv")
    record = json.loads(json_path.read_text())
    assert record["hierarchy_consistency"] == pytest.approx(5 / 7)
    assert record["levels"]["l2"]["ari"] == pytest.approx(df.loc["l2", "ari"])
    back = pd.read_csv(csv_path, index_col="level")
    assert back.loc["l1", "f1_macro"] == pytest.approx(df.loc["l1", "f1_macro"])


def test_run_metrics_score_each_subset_on_its_cells_with_a_true_label(tiny):
    """A run's first-look metrics (in memory and out of core alike): ARI per subset against sklearn on
    the cells with a true leaf, the scored cells counted, and a level with one true class among the
    scored cells (ARI 0 for any split, 1 for one cluster: it says nothing) flagged."""
    from types import SimpleNamespace
    from scvae_hier.outputs import run_metrics
    h, labels, pred = tiny
    truth = labels.copy()
    truth[6] = "nan"                                                      # no true leaf: never scored
    obs = pd.DataFrame({"leaf": labels, "split": ["test", "test", "train", "train", "test", "test", "train"]})
    given = np.full((7, 2), -1)
    given[[4, 5], 0] = 1                                                  # cells 4, 5 labelled Y
    model = SimpleNamespace(metadata={})
    metrics = run_metrics(model, h.levels, pred, obs, h, truth=truth, given=given)
    subsets = {"all": [0, 1, 2, 3, 4, 5], "test": [0, 1, 4, 5], "unlabelled": [0, 1, 2, 3]}
    assert metrics["ari"].keys() == subsets.keys()
    for subset, cells in subsets.items():
        for i, level in enumerate(h.levels):
            expected = adjusted_rand_score(h.level_labels(truth[cells])[:, i], pred[i][cells])
            assert metrics["ari"][subset][level] == pytest.approx(expected)
        assert metrics["ari_scored_cells"][subset] == {"cells": len(cells), "labelled": len(set(cells) & {4, 5})}
    assert metrics["ari_one_class_levels"] == {"unlabelled": ["l1"]}      # cells 0-3 are all X
    assert "ari_one_class_levels" not in run_metrics(model, h.levels, pred, obs, h)   # every cell scored: two classes
