"""Seconds of TreeVAE's two tree searches, each against the way it searched before, side by side.

1. Grouping k-means pieces into leaves (`assign_to_tree`, local search): beyond ten leaves each
   step is scored by what it changes (`_step_gains`) instead of in full (`_tree_scores` of every
   candidate). Synthetic pieces (4 per leaf, 20 dimensions) on trees of 12, 16 and 24 leaves.
2. Placing leaves with labels (`place_leaves`, exhaustive up to ten leaves): the labels' conflicts
   set aside as a cost (`least_exchange_cost`: one placement scored per set of exchanged slots)
   instead of splitting every slot from the others. PBMC's tree of ten leaves, finest labels on a
   few cells of every leaf.

The two variants of each search run alternately on the same inputs (`--repeats` times), so other
jobs on the machine slow both alike: read the ratios. Each line also says whether both returned
the same answer.

    python benchmarks/tree_search.py
    python benchmarks/tree_search.py --leaves 24 --starts 2 --repeats 1
"""
import argparse
import time

import numpy as np

import scvae_hier.tree_clustering as tree
from scvae_hier.tree_shape import leaf_ancestors


def grouping(n_leaves, starts, repeats, seed=0):
    """assign_to_tree on 4 pieces per leaf of a three-level tree: seconds with step gains, with
    full scores (the search up to ten leaves uses), and whether both found the same grouping."""
    rng = np.random.default_rng(seed)
    middle = max(2, n_leaves // 4)
    parents = [[i * 2 // middle for i in range(middle)], [i * middle // n_leaves for i in range(n_leaves)]]
    centres, counts = rng.normal(size=(4 * n_leaves, 20)), rng.integers(20, 200, 4 * n_leaves).astype(float)
    times, found = {"step gains": [], "full scores": []}, {}
    limit = tree.EXHAUSTIVE_LEAVES
    for _ in range(repeats):
        for variant in times:
            tree.EXHAUSTIVE_LEAVES = limit if variant == "step gains" else n_leaves
            try:
                start = time.perf_counter()
                found[variant] = tree.assign_to_tree(centres, counts, parents, n_leaves, seed=seed, starts=starts)
                times[variant].append(time.perf_counter() - start)
            finally:
                tree.EXHAUSTIVE_LEAVES = limit
    return times, np.array_equal(found["step gains"], found["full scores"])


def labelled_placement(repeats, seed=0):
    """place_leaves on PBMC's ten-leaf tree with finest labels: seconds with the conflicts as a
    cost, with the conflicts as slot columns (every slot distinct), and whether both agree."""
    rng = np.random.default_rng(seed)
    parents = [[0, 1, 1, 1, 1], [0, 1, 2, 3, 3, 4], [0, 1, 2, 3, 3, 3, 3, 4, 4, 5]]
    leaf = rng.integers(0, 10, 3000)
    latent = rng.normal(size=(10, 8))[leaf] * 3 + rng.normal(size=(3000, 8))
    allowed = np.ones((3000, 10), dtype=bool)
    labelled = rng.random(3000) < 0.02
    allowed[labelled] = np.eye(10, dtype=bool)[leaf[labelled]]
    conflicts = tree.label_conflicts(leaf, allowed, 10)
    plain_search = tree._best_permutation

    def slots_apart(k, scored, seed=0, chunk=40320, groups=None, tolerance=0.0, costs=None):
        """The search before: a slot's conflicts column part of what groups it (so none group)."""
        columns = tree.interchangeable_slots(leaf_ancestors(parents, 10)[:-1], conflicts)
        return plain_search(k, scored, seed, chunk, columns, tolerance)
    times, found = {"conflicts as a cost": [], "slots kept apart": []}, {}
    for _ in range(repeats):
        for variant in times:
            tree._best_permutation = plain_search if variant == "conflicts as a cost" else slots_apart
            try:
                start = time.perf_counter()
                found[variant] = tree.place_leaves(latent, leaf, parents, 10, conflicts=conflicts, top_level="linkage")
                times[variant].append(time.perf_counter() - start)
            finally:
                tree._best_permutation = plain_search
    return times, np.array_equal(*found.values())


def report(title, times, same):
    (new, new_times), (old, old_times) = times.items()
    print(f"{title}: {new} {np.median(new_times):.2f} s, {old} {np.median(old_times):.2f} s, "
          f"ratio {np.median(old_times) / np.median(new_times):.1f}x, same answer: {same}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[12, 16, 24])
    parser.add_argument("--starts", type=int, default=3, help="local-search starts per grouping (TreeVAE: 30)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for n_leaves in args.leaves:
        report(f"grouping {4 * n_leaves} pieces into {n_leaves} leaves, {args.starts} starts",
               *grouping(n_leaves, args.starts, args.repeats))
    report("placing PBMC's ten leaves with finest labels", *labelled_placement(args.repeats))


if __name__ == "__main__":
    main()
