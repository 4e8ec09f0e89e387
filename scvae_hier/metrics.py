"""Per-level clustering metrics: how well a model's clusters recover each level of a hierarchy.

Cluster ids are arbitrary, so label-based scores need a mapping from clusters to classes. Two
conventions are reported side by side (DESIGN §5):
- Hungarian: one-to-one, maximising matched cells. When there are more clusters than classes,
  the cells of unmatched clusters count as wrong, never as a hit; a class that no cluster is
  matched to gets F1 0. This punishes both over- and under-clustering.
- Majority vote (scVAE's convention): each cluster takes its most frequent class, many-to-one,
  so over-clustering is never punished. Kept for comparison with scVAE's logged accuracy.
"""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from .files import write_csv, write_text
from sklearn.metrics import (adjusted_mutual_info_score, adjusted_rand_score, f1_score,
                             normalized_mutual_info_score)


def _python(value):
    """A numpy scalar as its Python value; labels read from pandas (object arrays) are already Python."""
    return value.item() if isinstance(value, np.generic) else value


def _contingency(true, predicted):
    """Classes, clusters, the [classes x clusters] count table and each cell's class/cluster index."""
    true = np.asarray(true).ravel()
    predicted = np.asarray(predicted).ravel()
    if true.shape != predicted.shape:
        raise ValueError(f"true and predicted differ in length: {true.size} vs {predicted.size}")
    if true.size == 0:
        raise ValueError("no cells to score")
    classes, t = np.unique(true, return_inverse=True)
    clusters, p = np.unique(predicted, return_inverse=True)
    table = np.zeros((classes.size, clusters.size), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return classes, clusters, table, t, p


def _assignment(table):
    """Matched (class index, cluster index) pairs maximising the number of matched cells."""
    return linear_sum_assignment(table, maximize=True)


def _matches(true, predicted):
    """(cluster id, class name, whether that class is the cluster's most common) per Hungarian pair."""
    classes, clusters, table, _, _ = _contingency(true, predicted)
    rows, cols = _assignment(table)
    return [(_python(clusters[c]), _python(classes[r]), table[:, c].argmax() == r) for r, c in zip(rows, cols)]


def hungarian_mapping(true, predicted):
    """Predicted cluster id -> class name, one-to-one; unmatched clusters are left out."""
    return {cluster: name for cluster, name, _ in _matches(true, predicted)}


def cluster_names(true, predicted):
    """Predicted cluster id -> class name for naming clusters: the Hungarian match, kept only where
    the matched class is also the cluster's most common one. One-to-one matching must give every
    cluster a partner while classes last, so a second cluster of one type (Kang's CD4 T cells split
    in two) would otherwise be named after whatever class is left (NK cells: 9 of its 392 training
    cells); such a cluster stays unnamed."""
    return {cluster: name for cluster, name, own_majority in _matches(true, predicted) if own_majority}


def hungarian_f1(true, predicted):
    """F1 per class after the Hungarian mapping, with weighted/macro averages and accuracy.

    scikit-learn's f1_score on the mapped labels: cells of unmatched clusters are predictions of
    no class (a label outside `labels`), so they count as misses of their class and as no one's
    false positive; a class no cluster is matched to gets F1 0.
    """
    classes, true_index = np.unique(np.asarray(true).ravel(), return_inverse=True)
    index = {_python(cls): i for i, cls in enumerate(classes)}
    mapping = hungarian_mapping(true, predicted)
    mapped = np.array([index[mapping[p]] if p in mapping else -1      # -1: a cluster matched to no class
                       for p in np.asarray(predicted).ravel().tolist()])
    per_class = f1_score(true_index, mapped, labels=np.arange(classes.size), average=None, zero_division=0.0)
    support = np.bincount(true_index, minlength=classes.size)
    return {"weighted": float(np.sum(per_class * support) / support.sum()),
            "macro": float(np.mean(per_class)),
            "per_class": {_python(cls): float(v) for cls, v in zip(classes, per_class)},
            "accuracy": float(np.mean(mapped == true_index))}


def majority_accuracy(true, predicted):
    """Accuracy when each cluster is labelled with its most frequent class (scVAE's accuracy)."""
    _, _, table, _, _ = _contingency(true, predicted)
    return float(table.max(axis=0).sum() / table.sum())


def clustering_scores(true, predicted):
    """Label-free (ARI, NMI, AMI) and mapped (Hungarian F1/accuracy, majority accuracy) scores."""
    true = np.asarray(true).ravel()
    predicted = np.asarray(predicted).ravel()
    f1 = hungarian_f1(true, predicted)
    return {"ari": float(adjusted_rand_score(true, predicted)),
            "nmi": float(normalized_mutual_info_score(true, predicted)),
            "ami": float(adjusted_mutual_info_score(true, predicted)),
            "f1_weighted": f1["weighted"],
            "f1_macro": f1["macro"],
            "accuracy_hungarian": f1["accuracy"],
            "accuracy_majority": majority_accuracy(true, predicted),
            "n_clusters_used": int(np.unique(predicted).size),
            "n_classes": int(np.unique(true).size)}


def _mapped(true, predicted):
    """Each cell's class under the Hungarian mapping fitted on (true, predicted); None if unmatched."""
    classes, clusters, table, _, p = _contingency(true, predicted)
    rows, cols = _assignment(table)
    names = np.full(clusters.size, None, dtype=object)
    names[cols] = [_python(classes[r]) for r in rows]
    return names[p]


def hierarchy_consistency(hierarchy, predicted_by_level, true_by_level):
    """Fraction of cells whose per-level mapped labels form a valid path of the hierarchy.

    Each level's clusters are mapped to that level's classes by its own Hungarian mapping; a
    cell is consistent when every level's cluster is matched and each mapped class is a child of
    the class mapped at the level above.
    """
    n_levels = hierarchy.n_levels
    if len(predicted_by_level) != n_levels or len(true_by_level) != n_levels:
        raise ValueError(
            f"the hierarchy has {n_levels} levels {hierarchy.levels}, but got "
            f"{len(predicted_by_level)} predicted and {len(true_by_level)} true label arrays")
    mapped = [_mapped(t, p) for t, p in zip(true_by_level, predicted_by_level)]
    ok = np.array([m is not None for m in mapped[0]])
    for l in range(1, n_levels):
        parent = {path[l]: path[l - 1] for path in hierarchy.paths.values()}
        child, above = mapped[l], mapped[l - 1]
        ok &= np.array([c is not None and a is not None and parent.get(str(c)) == str(a)
                        for c, a in zip(child, above)])
    return float(ok.mean())


def nesting(predicted_by_level, parents=None):
    """Per level, the share of cells whose cluster at that level lies under their cluster at the
    level above (level 1: NaN, nothing above it). Unlike hierarchy consistency this needs no
    labels: it asks whether the predictions form a tree at all.

    parents: the model's own tree, one array per level after the first mapping each class index to
    its parent's index (TreeVAE's `parents`; 1.0 by construction for its predictions). Without a
    tree, a cluster's parent is the cluster above that holds most of its cells (majority parent)."""
    levels = [np.asarray(p).ravel() for p in predicted_by_level]
    shares = [np.nan]
    for l in range(1, len(levels)):
        child, above = levels[l], levels[l - 1]
        if parents is not None:
            parent_of = np.asarray(parents[l - 1])
            shares.append(float(np.mean(parent_of[child.astype(int)] == above)))
            continue
        _, _, table, child_index, above_index = _contingency(child, above)  # [child clusters x clusters above]
        shares.append(float(np.mean(table.argmax(axis=1)[child_index] == above_index)))
    return shares


def _per_level(predicted_by_level, n_levels):
    """A list of per-level predictions, or None when one flat array is given."""
    if isinstance(predicted_by_level, (list, tuple)):
        if len(predicted_by_level) != n_levels:
            raise ValueError(f"got predictions for {len(predicted_by_level)} levels; the "
                             f"hierarchy has {n_levels}")
        return [np.asarray(p).ravel() for p in predicted_by_level]
    array = np.asarray(predicted_by_level)
    if array.ndim == 2 and array.shape[1] == n_levels and n_levels > 1:
        return [array[:, l] for l in range(n_levels)]
    if array.ndim != 1:
        raise ValueError(f"predictions must be one array of cluster ids, a list of one per "
                         f"level, or an [n, {n_levels}] array; got shape {array.shape}")
    return None


def level_scores(hierarchy, labels, predicted_by_level):
    """clustering_scores at every level of the hierarchy (rows indexed by level name).

    A single array (a flat model) is scored against every level; per-level predictions are
    scored level by level and df.attrs["hierarchy_consistency"] is set (None for flat models).
    """
    truth = hierarchy.level_labels(labels)
    per_level = _per_level(predicted_by_level, hierarchy.n_levels)
    predictions = per_level or [np.asarray(predicted_by_level).ravel()] * hierarchy.n_levels
    for level, p in zip(hierarchy.levels, predictions):
        if p.size != truth.shape[0]:
            raise ValueError(f"{truth.shape[0]} labels but {p.size} predictions at level {level!r}")
    rows = [clustering_scores(truth[:, l], p) for l, p in enumerate(predictions)]
    df = pd.DataFrame(rows, index=pd.Index(hierarchy.levels, name="level"))
    df.attrs["hierarchy_consistency"] = (
        None if per_level is None
        else hierarchy_consistency(hierarchy, per_level, [truth[:, l] for l in range(truth.shape[1])]))
    return df


def _plain(value):
    """JSON-safe value: numpy scalars to Python, NaN to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    value = _python(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_scores(df, folder, name="metrics"):
    """Write the per-level scores as <name>.json (with df.attrs) and <name>.csv; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / f"{name}.json", folder / f"{name}.csv"
    record = {"levels": df.to_dict(orient="index"), **dict(df.attrs)}
    write_text(json_path, json.dumps(_plain(record), indent=2) + "\n")
    write_csv(df, csv_path, index_label=df.index.name or "level")
    return json_path, csv_path


def hierarchical_f1(true_paths, predicted_paths) -> float:
    """scHPL's hierarchical F1 of per-cell paths ([n, L] class names, coarse to fine, root left
    out): precision and recall of each cell's set of predicted nodes against its true nodes,
    summed over cells. A node is identified by its path prefix, so equal names under different
    parents differ; an "unassigned" level adds no node (it is neither right nor wrong)."""
    true_paths, predicted_paths = np.asarray(true_paths, dtype=object), np.asarray(predicted_paths, dtype=object)
    overlap = n_predicted = n_true = 0
    for truth, guess in zip(true_paths, predicted_paths):
        true_nodes = {tuple(truth[:i + 1]) for i in range(len(truth))}
        guessed = [tuple(guess[:i + 1]) for i in range(len(guess)) if guess[i] != "unassigned"]
        overlap += len(true_nodes.intersection(guessed))
        n_predicted += len(guessed)
        n_true += len(true_nodes)
    precision = overlap / n_predicted if n_predicted else 0.0
    recall = overlap / n_true if n_true else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
