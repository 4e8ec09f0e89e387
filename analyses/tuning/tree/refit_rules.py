"""Which clustering of the latent should seed TreeVAE's tree? Offline, on the restart runs (no training).

    python analyses/tuning/tree/refit_rules.py [--rules kmeans2,kmeans4,...] [RUN ...]   # default: restart_f*_w*
    python analyses/tuning/tree/refit_rules.py report

The restarts (restarts.py, NOTES.md) land in modes where one leaf slot of the fixed tree is
misused: k-means into 2 clusters per leaf splits the big classes and rarely isolates the 0.8%
megakaryocytes, so the tree assignment (`assign_to_tree`, every leaf at least one cluster) gives
their single-leaf level-2 node part of a big class. This script keeps each run's trained encoder
and redoes only the final prior refit (`TreeVAE.refit_prior`: re-seed + 10 EM steps) with other
first clusterings of the training cells' latent means, then scores validation and test cells:
- kmeans2: today's rule (k-means, 2 clusters per leaf);
- kmeans4: k-means, 4 clusters per leaf;
- leidenK2: Leiden on the latent's 15-NN graph, resolution bisected to 2 clusters per leaf;
- leiden1: Leiden at resolution 1 (scanpy's default), whatever count it gives (at least K_L).
The rule is chosen on validation cells; test cells are reported beside. Lines go to
refit_rules.jsonl (one per run and rule; a rerun skips what is there).
"""
import os
import sys

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

import scvae_hier.tree_clustering as tree  # noqa: E402
from scvae_hier.analysis.leiden import leiden, leiden_at_k, neighbour_graph  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "refit_rules.jsonl"
sys.path.insert(0, str(HERE))
from refit import load_run, scores_by_part  # noqa: E402


def first_clusters(rule, latent, n_leaves, seed):
    """Cluster labels [n] of the latent means by one rule."""
    if rule.startswith("kmeans"):
        k = int(rule[len("kmeans"):]) * n_leaves
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(latent).labels_
    graph = neighbour_graph(latent, seed=seed)
    if rule == "leiden1":
        labels = leiden(graph, 1.0, seed)
        return labels if labels.max() + 1 >= n_leaves else leiden_at_k(graph, 2 * n_leaves, seed, strict=False).labels
    return leiden_at_k(graph, int(rule[len("leidenK"):]) * n_leaves, seed, strict=False).labels


def graph_scores(edges):
    """A stand-in for tree._tree_scores: the summed modularity, over the levels, of the classes an
    assignment makes, on the clusters' kNN edge weights `edges` [K, K] (within-class edges minus
    what random wiring of the same degrees gives). Separated groups count, whatever their size."""
    total = edges.sum()
    degree = edges.sum(axis=1)

    def scores(centres, counts, ancestors, assignments):
        score = np.zeros(len(assignments))
        for row in ancestors:
            nodes = row[assignments]                                           # [A, K]
            onehot = (nodes[:, :, None] == np.arange(row.max() + 1)).astype(float)   # [A, K, J]
            inside = np.einsum("aij,ik,akj->aj", onehot, edges, onehot)
            degrees = np.einsum("akj,k->aj", onehot, degree)
            score += (inside / total - (degrees / total) ** 2).sum(-1)
        return score
    return scores


def clustering_by(rule):
    """A drop-in for tree.tree_clustering (unlabelled, one component per leaf) using `rule`;
    a rule ending in 'graph' groups the clusters into the tree by kNN-graph modularity instead of
    compactness (sum of squares)."""
    def clustering(latent, parents, n_leaves, per_leaf=1, seed=0, clusters_per_leaf=2, n_init=10, allowed=None,
                   novel=0):
        assert per_leaf == 1 and allowed is None
        labels = first_clusters(rule.removesuffix("graph"), latent, n_leaves, seed)
        k = labels.max() + 1
        centres = np.array([latent[labels == j].mean(axis=0) for j in range(k)])
        counts = np.bincount(labels, minlength=k)
        compactness = tree._tree_scores
        if rule.endswith("graph"):
            onehot = np.eye(k)[labels]
            tree._tree_scores = graph_scores(onehot.T @ neighbour_graph(latent, seed=seed) @ onehot)
        try:
            return tree.assign_to_tree(centres, counts, parents, n_leaves, seed)[labels]
        finally:
            tree._tree_scores = compactness
    return clustering


def main(folders, rules=("kmeans2", "kmeans4", "leidenK2", "leiden1")):
    done = set()
    if OUT.exists():
        done = {(r["run"], r["rule"]) for r in map(json.loads, OUT.read_text().splitlines())}
    for folder in folders:
        if all((folder.name, rule) in done for rule in rules):
            continue
        _, loc, scale, split, truth = load_run(folder)
        train = split == "train"
        for rule in rules:
            if (folder.name, rule) in done:
                continue
            fresh = keras.saving.load_model(folder / "model.keras")
            tree.tree_clustering = clustering_by(rule)
            fresh.refit_prior(loc[train], scale[train], steps=fresh.final_refit or 10)
            row = {"run": folder.name, "rule": rule, **scores_by_part(fresh, loc, scale, split, truth, digits=4)}
            with open(OUT, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(row, flush=True)


def report():
    rows = [json.loads(line) for line in OUT.read_text().splitlines()]
    datasets = {"restart": "Kang", "pbmc": "PBMC"}
    for (prefix, rule) in dict.fromkeys((r["run"].split("_")[0], r["rule"]) for r in rows):
        for part in ("validation", "test"):
            table = np.array([r[part] for r in rows if r["rule"] == rule and r["run"].split("_")[0] == prefix])
            print(f"{datasets.get(prefix, prefix):<5} {rule:<13} {part:<10} n={len(table):>2}  ARI L1-L4 / wF1 mean "
                  + " / ".join(f"{m:.2f}" for m in table.mean(0)) + "   min " + " / ".join(f"{m:.2f}" for m in table.min(0)))


if __name__ == "__main__":
    if sys.argv[1:] == ["report"]:
        report()
    else:
        arguments = sys.argv[1:]
        rules = ("kmeans2", "kmeans4", "leidenK2", "leiden1")
        if arguments[:1] == ["--rules"]:
            rules, arguments = tuple(arguments[1].split(",")), arguments[2:]
        main([Path(p) for p in arguments] or sorted(Path("/work/tree_runs").glob("restart_f?_w?")), rules)
