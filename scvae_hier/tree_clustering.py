"""Clustering a latent into the user's tree: what TreeVAE's re-seeding and final refit run on the latent.

Three steps, each a function here: k-means pieces of the cells' latent means grouped into the
tree's leaves so that every level's classes are compact (`tree_clustering`, `assign_to_tree`);
the leaves placed in the tree's slots, the top level by compactness or average linkage and the
levels below by the latent's nearest-neighbour graph (`place_leaves`); and, where the user gives
marker genes, the pieces moved so that each marked class holds its markers
(`regroup_by_markers`). Why each rule and constant: analyses/tuning/tree/NOTES.md.
"""
import itertools
import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans
from sklearn.neighbors import NearestNeighbors

from .choices import LEAF_PLACEMENTS, TOP_LEVEL_SPLITS, check_choice
from .tree_shape import TREE_SHRINK, leaf_ancestors

EXHAUSTIVE_LEAVES = 10  # leaves up to which match_to_tree tries every assignment (10! = 3.6M)
GRAPH_NEIGHBOURS = 15   # neighbours per cell in the graph that places leaves (scanpy's default)
GRAPH_CELLS = 20000     # cells that graph is built on at most (a seeded subsample beyond)
LINKAGE_CELLS = 500     # cells per leaf that the average distances between leaves are measured on at most
LEAF_TOLERANCE = 1.2    # how much less compact (within-leaf sum of squares) coarse-first leaves may be
TOP_LEVEL_FIRST = 1e6   # weight of the top level's compactness (in [0, 1]) over the graph terms (at most 1)
MARKERS_FIRST = 1e9     # weight of each marker violation: above the top level's whole term (TOP_LEVEL_FIRST)
# Weight of the classes' spread below the top level (average distance between their leaves' cells,
# in [0, 1] per level) after the graph terms: it decides where the graph cannot, leaves that share
# no neighbour links (a hierarchy of distinct types: every grouping then keeps all links inside),
# and is far below any graph difference seen on real cells (PBMC's closest tie: 0.0005).
SPREAD_AFTER_GRAPH = 1e-6
# With the top level by linkage, a top class must hold at least this share of an even split of the
# cells over its leaves (a one-leaf class of nine: 2.8% of the cells); smaller, it is a fragment
# set apart for being far (PBMC: ~80 myeloid-like cells of the CD34+ sort), not a class.
MIN_TOP_SHARE = 0.25
# Below the top level (linkage only), a class must hold at least this share of its even split: a
# one-leaf class of ten, 0.5% of the cells. Smaller, it is a fragment (PBMC's ten populations: 22
# far, mixed cells took NK's one-leaf level-2 class and pushed NK under T), while real rare types
# keep their class (Kang: dendritic cells 1.7%, megakaryocytes 0.8%, each one leaf of eight).
MIN_CLASS_SHARE = 0.05
# A nearest other grouping of the leaves scoring less than this below the chosen one (graph terms,
# at most levels - 2 in all) is a near tie: PBMC's CD4 / CD8 T split scores within 0.0015 in every
# run measured, while it moves level-3 ARI 0.63 <-> 0.92 (NOTES.md, placement_margin.jsonl).
NEAR_TIE = 0.01
# Pieces are cut by their mean marker score on a log scale: on Kang, CD3D / CD3G range over 1.2-2.4
# across CD4 T pieces and 0.2-0.3 across NK pieces, and a cut of the plain means put a CD4 piece of low
# counts under NK. Below OFF_SCORE (about one count in a hundred cells) a marker counts as off.
OFF_SCORE = 0.01
NOVEL_EVIDENCE = 5.0    # labelled cells a cluster should hold (size x labelled share) before holding none
                        # makes it a type nobody labelled (P(0 | Poisson 5) < 0.007)


def prune_leaves(parents, n_leaves, empty):
    """The tree without the leaves `empty` (and the classes left with no leaf): (its parents, the
    original index of each of its leaves). Classes keep their order."""
    kept = np.setdiff1d(np.arange(n_leaves), np.asarray(empty, dtype=int))
    codes = [np.unique(row, return_inverse=True)[1] for row in leaf_ancestors(parents, n_leaves)[:, kept]]
    pruned = []
    for coarse, fine in zip(codes[:-1], codes[1:]):
        links = np.zeros(fine.max() + 1, dtype=int)
        links[fine] = coarse
        pruned.append(links.tolist())
    return pruned, kept


def _class_onehot(row, assignments):
    """[A, K, J] float: whether item k's slot under assignment a lies under class j of the level whose
    class of each slot is `row` [K]."""
    return (np.asarray(row)[assignments][..., None] == np.arange(row.max() + 1)).astype(float)


def _tree_scores(centres, counts, ancestors, assignments, level_weights=None):
    """Between-class sum of squares, summed over the levels (each times its weight in
    `level_weights`, default 1), of each assignment of clusters to leaves ([A, K]: cluster i goes
    to leaf assignments[a, i]). Larger is better: the total sum of squares is fixed, so this is
    minus the within-class sum of squares. The clusters' sums are gathered per leaf once and then
    per class of each level (a class's sum is its leaves'), which is what keeps the searches over
    assignments fast."""
    summed = np.column_stack([centres * counts[:, None], counts])                    # [K, D + 1]
    n_leaves = len(ancestors[0])
    if assignments.shape[1] == n_leaves and (np.sort(assignments, axis=1) == np.arange(n_leaves)).all():
        # one cluster per leaf: its row, gathered, is bit for bit what the product below gives
        per_leaf = np.empty((len(assignments), n_leaves, summed.shape[1]))
        per_leaf[np.arange(len(assignments))[:, None], assignments] = summed
    else:
        into_leaves = _class_onehot(np.arange(n_leaves), assignments).transpose(0, 2, 1)  # [A, leaves, K]
        per_leaf = into_leaves @ summed
    per_leaf = per_leaf.transpose(0, 2, 1)                                             # [A, D + 1, leaves]
    score = np.zeros(len(assignments))
    for level, row in enumerate(ancestors):
        per_class = per_leaf @ np.eye(row.max() + 1)[row]                              # [A, D + 1, J]
        sums, sizes = per_class[:, :-1], per_class[:, -1]
        weight = 1.0 if level_weights is None else level_weights[level]
        score += weight * (np.einsum("adj,adj->aj", sums, sums) / np.maximum(sizes, 1e-12)).sum(-1)
    return score


def coarse_first_weights(n_levels, decay):
    """Weights of the levels' compactness when clusters are grouped into the tree: decay^(l-1) for
    level l (1 = the top), so with decay < 1 a coarse level counts more than the ones below it."""
    return float(decay) ** np.arange(n_levels)


def _label_penalty(penalty, assignments):
    """[A] number of labelled cells each assignment puts under a leaf their labels exclude."""
    if penalty is None:
        return 0.0
    return penalty[np.arange(penalty.shape[0]), assignments].sum(-1)


def permutation_blocks(k, chunk=40320, groups=None):
    """The permutations a of range(k) (item i to slot a[i]) in lexicographic order, in blocks
    [<= chunk, K] (the permutations that share a prefix). With `groups` [K] (a group id per slot),
    only the canonical ones: those that give the slots of every group to its items in increasing
    order, one per set of permutations that differ only by exchanging slots of a group, and the
    lexicographically first of its set (K! / prod(group sizes!) of them)."""
    tail = max(t for t in range(1, k + 1) if math.factorial(t) <= chunk)
    ends = np.array(list(itertools.permutations(range(tail))), dtype=np.int16)        # [tail!, tail]
    pairs = list(itertools.combinations(range(k), 2))
    if groups is not None and len(np.unique(groups)) == k:
        groups = None                           # no two slots alike: every permutation is canonical
    for prefix in itertools.permutations(range(k), k - tail):
        rest = np.array(sorted(set(range(k)) - set(prefix)), dtype=np.int16)
        block = np.column_stack([np.tile(np.array(prefix, dtype=np.int16), (len(ends), 1)), rest[ends]])
        if groups is not None:
            slot_group = np.asarray(groups)[block]
            canonical = np.ones(len(block), dtype=bool)
            for i, j in pairs:                  # items i < j in one group's slots: i takes the lower
                canonical &= (slot_group[:, i] != slot_group[:, j]) | (block[:, i] < block[:, j])
            block = block[canonical]
        if len(block):
            yield block


def interchangeable_slots(*columns):
    """[K] group id of every slot: slots whose columns are equal in every [., K] array of `columns`
    (what a placement score reads per slot) are interchangeable, since exchanging them changes no
    score."""
    features = np.vstack([np.asarray(c, float).reshape(-1, np.shape(c)[-1]) for c in columns])
    return np.unique(features.T, axis=0, return_inverse=True)[1].ravel()


def exchanges(groups):
    """[E, K] every map of slots (slot s to map[s]) that only exchanges slots within their groups."""
    groups = np.asarray(groups)
    slots = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    maps = []
    for orders in itertools.product(*(itertools.permutations(members) for members in slots)):
        slot_map = np.arange(len(groups))
        for members, order in zip(slots, orders):
            slot_map[members] = order
        maps.append(slot_map)
    return np.array(maps, dtype=np.int16)


def least_exchange_cost(costs, groups, assignments):
    """[A] the least total cost (item i in slot s costs costs[i, s]) over the placements that only
    exchange slots of one group ([K] group ids) among themselves, for each assignment ([A, K]: item
    i to slot a[i]). Per group, an assignment problem of its few slots, solved exactly by dynamic
    programming over the subsets of them it has filled."""
    assignments = np.asarray(assignments)
    item_in = np.empty_like(assignments)
    item_in[np.arange(len(assignments))[:, None], assignments] = np.arange(assignments.shape[1])
    costs, groups = np.asarray(costs, float), np.asarray(groups)
    total = np.zeros(len(assignments))
    for group in np.unique(groups):
        slots = np.flatnonzero(groups == group)
        cost = costs[item_in[:, slots][:, :, None], slots[None, None, :]]                        # [A, item, slot]
        filled = np.full((len(assignments), 1 << len(slots)), np.inf)
        filled[:, 0] = 0.0
        for subset in range(1 << len(slots)):            # its bit count says which item comes next
            item = bin(subset).count("1")
            if item == len(slots):
                continue
            for slot in range(len(slots)):
                if not subset >> slot & 1:
                    wider = subset | 1 << slot
                    filled[:, wider] = np.minimum(filled[:, wider], filled[:, subset] + cost[:, item, slot])
        total += filled[:, -1]
    return total


def _best_permutation(k, scored, seed=0, chunk=40320, groups=None, tolerance=0.0, costs=None):
    """The permutation a [K] (item i to slot a[i]) with the largest `scored` (a function of [A, K]
    stacks): exhaustive up to EXHAUSTIVE_LEAVES items, pairwise swaps from 20 random starts beyond.
    The first in lexicographic order wins a tie. `groups` [K] (`interchangeable_slots`): slots
    `scored` cannot tell apart but for rounding, by at most `tolerance`; the exhaustive search then
    scores one permutation of each set that differs only by exchanging them
    (`permutation_blocks`, e.g. 3.6M -> 75,600 for PBMC's ten leaves, four of them CD4 T and
    two CD8 T), rescores every member of the sets whose one came within `tolerance` of the best,
    and so returns the very permutation the search over all of them returns.

    costs (rest, weight, matrix [K items, K slots]): `scored(a)` is rest(a) - weight * the sum of
    matrix[i, a[i]], and `groups` need only make `rest` alike. A set is then scored by its member
    of least cost (`least_exchange_cost`), so slots that labels tell apart (one conflict column per
    slot) still group: with PBMC's finest labels, 75,600 sets are scored instead of 3.6M."""
    if k <= EXHAUSTIVE_LEAVES:
        best, best_score, near = None, -np.inf, []
        # the last additions round at the size of the score itself, beyond what `tolerance` covers
        floor = lambda: best_score - tolerance - 1e-12 * abs(best_score)  # noqa: E731
        if groups is not None and costs is not None:
            rest, weight, matrix = costs
            score_sets = lambda block: rest(block) - weight * least_exchange_cost(matrix, groups, block)  # noqa: E731
        else:
            score_sets = scored
        for block in permutation_blocks(k, chunk, groups):
            scores = score_sets(block)
            if scores.max() > best_score:
                best_score, best = scores.max(), block[scores.argmax()]
            if groups is not None:
                near = [(rows[s >= floor()], s[s >= floor()]) for rows, s in near + [(block, scores)]]
        if groups is None:
            return np.asarray(best, dtype=int)
        near = np.concatenate([rows for rows, _ in near])
        members = exchanges(groups)[:, near].reshape(-1, k)            # every set's members, rescored
        scores = np.concatenate([scored(members[i:i + chunk]) for i in range(0, len(members), chunk)])
        tied = members[scores == scores.max()]
        return np.asarray(tied[np.lexsort(tied.T[::-1])[0]], dtype=int)
    rng = np.random.default_rng(seed)
    best, best_score = None, -np.inf
    for _ in range(20):
        current = rng.permutation(k)
        score = scored(current[None])[0]
        improved = True
        while improved:
            swaps = [(i, j) for i in range(k) for j in range(i + 1, k)]
            candidates = np.repeat(current[None], len(swaps), axis=0)
            for row, (i, j) in enumerate(swaps):
                candidates[row, [i, j]] = candidates[row, [j, i]]
            scores = scored(candidates)
            improved = scores.max() > score + 1e-9
            if improved:
                current, score = candidates[scores.argmax()], scores.max()
        if score > best_score:
            best, best_score = current, score
    return np.asarray(best, dtype=int)


def match_to_tree(centres, counts, parents, seed=0, penalty=None, level_weights=None):
    """Assign K clusters (centres [K, D], sizes [K]) one-to-one to the K leaves of the tree so that
    the classes of every coarser level are as compact as possible (least within-class sum of
    squares of the cells, summed over levels). `penalty` [K, K] (labelled cells of cluster i whose
    labels exclude leaf k) comes first: a labelled cell put under a wrong leaf outweighs any
    compactness. `level_weights` [L] weigh the levels' compactness (default: all 1). Returns
    leaf_of_cluster [K]."""
    centres, counts = np.asarray(centres, float), np.asarray(counts, float)
    ancestors = leaf_ancestors(parents, len(centres))
    weight = _penalty_weight(centres, counts)
    return _best_permutation(len(centres), lambda a: _tree_scores(centres, counts, ancestors, a, level_weights)
                             - weight * _label_penalty(penalty, a), seed)


def _penalty_weight(centres, counts):
    """More than the largest possible gain in compactness: the total sum of squares of the centres."""
    mean = (centres * counts[:, None]).sum(0) / max(counts.sum(), 1e-12)
    return float((counts * ((centres - mean) ** 2).sum(-1)).sum()) * len(centres) + 1.0


def assign_to_tree(centres, counts, parents, n_leaves, seed=0, starts=30, penalty=None, level_weights=None):
    """Assign K >= n_leaves clusters to leaves (every leaf at least one) so that the classes of every
    level, leaves included, are as compact as possible: local search (moves of one cluster to
    another leaf, swaps of two) from `starts` random assignments. `penalty` [K, n_leaves] and
    `level_weights` [L] as in `match_to_tree`. Returns leaf_of_cluster [K]."""
    centres, counts = np.asarray(centres, float), np.asarray(counts, float)
    k = len(centres)
    if k == n_leaves and k <= EXHAUSTIVE_LEAVES:
        return match_to_tree(centres, counts, parents, seed, penalty=penalty, level_weights=level_weights)
    ancestors = leaf_ancestors(parents, n_leaves)
    weight = _penalty_weight(centres, counts)
    scored = lambda a: (_tree_scores(centres, counts, ancestors, a, level_weights)  # noqa: E731
                        - weight * _label_penalty(penalty, a))
    rng = np.random.default_rng(seed)
    best, best_score = None, -np.inf
    for _ in range(starts):
        current = np.concatenate([rng.permutation(n_leaves), rng.integers(0, n_leaves, k - n_leaves)])[rng.permutation(k)]
        score = scored(current[None])[0]
        while True:
            candidates = _one_step_away(current, n_leaves)
            if n_leaves > EXHAUSTIVE_LEAVES:
                # scored by what each step changes, then the chosen one in full: the same search up to
                # rounding, 13x faster for 24 leaves (benchmarks/tree_search.py; trees up to ten leaves
                # keep the full scores, so their runs stay bit for bit what they were)
                scores = score + _step_gains(centres, counts, ancestors, current, candidates, level_weights,
                                             None if penalty is None else weight * np.asarray(penalty, float))
            else:
                scores = scored(candidates)
            if scores.max() <= score + 1e-9:
                break
            current = candidates[scores.argmax()]
            score = scored(current[None])[0] if n_leaves > EXHAUSTIVE_LEAVES else scores.max()
        if score > best_score:
            best, best_score = current, score
    return np.asarray(best, dtype=int)


def _step_gains(centres, counts, ancestors, current, candidates, level_weights=None, penalty=None):
    """[C] how much `_tree_scores` (minus `penalty` [K, leaves] summed over the clusters' leaves)
    gains from `current` [K] to each candidate one step away (`_one_step_away`: one cluster moved
    or two swapped). A step carries a bundle (a cluster's sum and size, or one's minus the other's)
    from one class to another at each level where the two leaves' classes differ; only those two
    classes' terms |sum|^2 / size change."""
    centres, counts = np.asarray(centres, float), np.asarray(counts, float)
    changed = candidates != current[None, :]                                          # [C, K]: 1 or 2 True
    first = changed.argmax(axis=1)
    second = np.where(changed.sum(axis=1) == 2, len(current) - 1 - changed[:, ::-1].argmax(axis=1), first)
    swap = second != first
    source, target = current[first], candidates[np.arange(len(candidates)), first]
    summed = centres * counts[:, None]
    bundle = summed[first] - np.where(swap[:, None], summed[second], 0.0)              # [C, D]
    size = counts[first] - np.where(swap, counts[second], 0.0)
    term = lambda sums, sizes: (sums ** 2).sum(-1) / np.maximum(sizes, 1e-12)         # noqa: E731
    gains = np.zeros(len(candidates))
    for level, row in enumerate(ancestors):
        class_sums = np.zeros((row.max() + 1, centres.shape[1]))
        np.add.at(class_sums, row[current], summed)
        class_sizes = np.bincount(row[current], weights=counts, minlength=row.max() + 1)
        out, into = row[source], row[target]
        gain = (term(class_sums[out] - bundle, class_sizes[out] - size) + term(class_sums[into] + bundle, class_sizes[into] + size)
                - term(class_sums[out], class_sizes[out]) - term(class_sums[into], class_sizes[into]))
        gains += (1.0 if level_weights is None else level_weights[level]) * np.where(out != into, gain, 0.0)
    if penalty is not None:
        gains -= (penalty[first, target] - penalty[first, source]
                  + np.where(swap, penalty[second, source] - penalty[second, target], 0.0))
    return gains


def _one_step_away(current, n_leaves):
    """[C, K] the assignments (cluster i to leaf current[i]) one step from `current`: one cluster
    moved to another leaf (if its own keeps another cluster), or two clusters of different leaves
    swapped; ordered by the first cluster changed, its moves before its swaps."""
    k = len(current)
    sizes = np.bincount(current, minlength=n_leaves)
    moved, leaf = np.divmod(np.arange(k * n_leaves), n_leaves)
    keep = (leaf != current[moved]) & (sizes[current[moved]] > 1)
    moved, leaf = moved[keep], leaf[keep]
    first, second = np.triu_indices(k, 1)
    keep = current[first] != current[second]
    first, second = first[keep], second[keep]
    candidates = np.repeat(current[None], len(moved) + len(first), axis=0)
    candidates[np.arange(len(moved)), moved] = leaf
    swaps = np.arange(len(moved), len(candidates))
    candidates[swaps, first], candidates[swaps, second] = current[second], current[first]
    order = np.lexsort((np.r_[leaf, second], np.r_[np.zeros_like(moved), np.ones_like(first)], np.r_[moved, first]))
    return candidates[order]


def leaf_links(latent, leaf, n_leaves, neighbours=GRAPH_NEIGHBOURS, max_cells=GRAPH_CELLS, seed=0):
    """[n_leaves, n_leaves] symmetric count of k-nearest-neighbour links (Euclidean, in the latent)
    between the cells of every two leaves, on at most `max_cells` cells (a seeded subsample)."""
    latent, leaf = np.asarray(latent), np.asarray(leaf)
    if len(leaf) > max_cells:
        keep = np.random.default_rng(seed).choice(len(leaf), max_cells, replace=False)
        latent, leaf = latent[keep], leaf[keep]
    neighbours = min(neighbours, len(leaf) - 1)
    index = NearestNeighbors(n_neighbors=neighbours + 1).fit(latent).kneighbors(latent, return_distance=False)[:, 1:]
    links = np.zeros((n_leaves, n_leaves))
    np.add.at(links, (np.repeat(leaf, neighbours), leaf[index].ravel()), 1.0)
    return links + links.T


def leaf_distances(latent, leaf, n_leaves, max_cells=LINKAGE_CELLS, seed=0):
    """[n_leaves, n_leaves] mean Euclidean distance between the cells of every two leaves (the
    average linkage of UPGMA), on at most `max_cells` cells per leaf (a seeded subsample); 0 for
    an empty leaf."""
    latent, leaf = np.asarray(latent, float), np.asarray(leaf)
    rng = np.random.default_rng(seed)
    cells = []
    for k in range(n_leaves):
        members = np.flatnonzero(leaf == k)
        cells.append(latent[rng.choice(members, min(len(members), max_cells), replace=False)])
    distances = np.zeros((n_leaves, n_leaves))
    for i in range(n_leaves):
        for j in range(i, n_leaves):
            if len(cells[i]) and len(cells[j]):
                distances[i, j] = distances[j, i] = cdist(cells[i], cells[j]).mean()
    return distances


def _class_linkage(distances, counts, row, assignments):
    """([A, J, J] the average linkage between every two classes of the level whose class of each
    slot is `row` [K], the mean distance between their cells from the leaves' `distances` weighted
    by the leaves' cell `counts`, under each assignment of leaves to slots ([A, K]); [A, J] the
    classes' cells). Shared by the top level's separation and the spread below it."""
    counts = np.asarray(counts, float)
    onehot = _class_onehot(row, assignments)                                     # [A, K, J]
    between = np.einsum("aij,ik,akl->ajl", onehot, counts[:, None] * counts[None, :] * distances, onehot)
    sizes = np.einsum("akj,k->aj", onehot, counts)
    return between / np.maximum(sizes[:, :, None] * sizes[:, None, :], 1e-12), sizes


def _linkage_scores(distances, counts, top, assignments):
    """How far apart the top level's classes are under each assignment of leaves to slots ([A, K]:
    leaf i goes to slot assignments[a, i]; `top` [K] the top class of every slot): the average
    linkage between every two classes (`_class_linkage`), averaged over the pairs of classes.
    Larger is better. Unlike the sum of squares, a class's size does not weigh in."""
    linkage, _ = _class_linkage(distances, counts, top, assignments)
    first, second = np.triu_indices(linkage.shape[-1], 1)
    if not len(first):              # one top class (a tree pruned by empty leaves): nothing to set apart
        return np.zeros(len(assignments))
    return linkage[:, first, second].mean(-1)


def fragment_classes(counts, rows, assignments, share):
    """[A] the number of classes, over the levels whose class of each slot is a row of `rows`, that
    hold fewer cells than `share` of their even share (their number of slots over all slots, times
    all cells; `counts` [K] per leaf) under each assignment ([A, K])."""
    counts = np.asarray(counts, float)
    found = np.zeros(len(assignments), dtype=int)
    for row in rows:
        held = np.einsum("akj,k->aj", _class_onehot(row, assignments), counts)        # [A, J]
        even = np.bincount(row, minlength=held.shape[1]) / len(row) * counts.sum()    # [J]
        found += (held < share * even).sum(axis=1)
    return found


def _too_small(counts, top, assignments, share=MIN_TOP_SHARE):
    """[A] bool: the assignments ([A, K]) under which some top class is a fragment (`fragment_classes`)."""
    return fragment_classes(counts, [top], assignments, share) > 0


def _graph_scores(links, ancestors, assignments):
    """How well the classes below the top level of each assignment of leaves to slots ([A, K]: leaf
    i goes to slot assignments[a, i]) hold their links: per level, the share of a class's links
    that stay inside it, averaged over the level's classes (its normalised association over its
    number of classes, so every level counts in [0, 1]), summed over levels 2..L-1 with weight
    TREE_SHRINK^(l-1) like the levels' mean offsets. Larger is better. The top level is left to
    compactness (`place_leaves`) and the leaf level is fixed."""
    score = np.zeros(len(assignments))
    for level in range(1, len(ancestors) - 1):
        onehot = _class_onehot(ancestors[level], assignments)                 # [A, K, J]
        through = np.tensordot(onehot, links, axes=(1, 0))                    # [A, J, K]: links out of class j
        inside = np.einsum("ajk,akj->aj", through, onehot)
        volume = through.sum(-1)
        score += TREE_SHRINK ** level * (inside / np.maximum(volume, 1e-12)).mean(-1)
    return score


def _spread_scores(distances, counts, rows, assignments):
    """[A] how spread the classes are, over the levels whose class of each slot is a row of `rows`,
    under each assignment of leaves to slots ([A, K]): per level, the mean distance between the
    cells of a class (its average linkage with itself, `_class_linkage`), averaged over the classes
    that hold cells, over the largest distance so that each level counts in [0, 1]. Smaller is better."""
    spread = np.zeros(len(assignments))
    for row in rows:
        linkage, sizes = _class_linkage(distances, counts, row, assignments)
        held = sizes > 0
        spread += np.where(held, np.diagonal(linkage, axis1=1, axis2=2), 0.0).sum(-1) / np.maximum(held.sum(-1), 1)
    return spread / max(distances.max(), 1e-12)


def relatives_level(ancestors, level, k):
    """The level of the nearest ancestor of class k (at `level`) that holds more leaves than it, or
    -1 if none (then every slot is a relative). A one-child ancestor (PBMC's Stem above CD34 HSC)
    holds the same leaves, so it is skipped."""
    slots_in = ancestors[level] == k
    for coarser in range(level - 1, -1, -1):
        if (ancestors[coarser] == ancestors[coarser][np.flatnonzero(slots_in)[0]]).sum() > slots_in.sum():
            return coarser
    return -1


def marker_relatives(ancestors, level, k):
    """[K] bool: the slots under the nearest ancestor of class k (at `level`) that holds more leaves
    than it (every slot if none, `relatives_level`): the leaves a marked class is compared with."""
    coarser = relatives_level(ancestors, level, k)
    if coarser < 0:
        return np.ones(ancestors.shape[1], dtype=bool)
    return ancestors[coarser] == ancestors[coarser][np.flatnonzero(ancestors[level] == k)[0]]


def marker_violations(means, classes, ancestors, assignments):
    """[A] for each assignment of leaves to slots ([A, K]: leaf i goes to slot assignments[a, i]),
    how far the marked classes are from holding the leaves where their markers are highest: per
    marker set s, of class classes[s] = (level, class) and mean score means[s, i] in leaf i, the
    pairs of a leaf under the class and a leaf outside it but among its relatives
    (`marker_relatives`) where the second has the higher mean. 0 when every marked class holds the
    leaves of highest marker expression among its relatives."""
    violations = np.zeros(len(assignments))
    for m, (level, k) in zip(np.asarray(means, float), classes):
        slots_in = ancestors[level] == k
        inside = slots_in[assignments]
        outside = (marker_relatives(ancestors, level, k) & ~slots_in)[assignments]      # [A, K]
        higher = (m[None, :] > m[:, None]).astype(float)                               # [i, j]: m_j > m_i
        violations += np.einsum("ai,ij,aj->a", inside.astype(float), higher, outside.astype(float))
    return violations


def stays_one_class(row, leaves, assignments):
    """[A] whether the leaves `leaves` [K] bool, under each assignment ([A, K]: leaf i to slot a[i]),
    are exactly the leaves of one class of the level whose class of each slot is `row` [K]."""
    classes = np.asarray(row)[np.asarray(assignments)]                                   # [A, K]
    first = classes[:, np.flatnonzero(leaves)[0]][:, None]
    return ((classes == first) == np.asarray(leaves)[None, :]).all(axis=1)


def marker_shortfall(means, counts, marked, assignments):
    """[A] in [0, 1): how far, on average over the marker sets, each marked class's cells (leaf i of
    counts[i] cells and mean score means[s, i] goes to slot assignments[a, i]; marked [S, K slots])
    score below the highest leaf mean, as a share of it, halved: a tie-breaker below one violation."""
    means = np.where(np.isfinite(means), means, 0.0)
    shortfall = np.zeros(len(assignments))
    for m, slots in zip(means, np.asarray(marked)):
        weights = slots[assignments] * np.asarray(counts, float)[None, :]                     # [A, K]
        held = (weights * m[None, :]).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-12)
        shortfall += 1.0 - held / max(m.max(), 1e-12)
    return 0.5 * shortfall / max(len(means), 1)


def _placement_objective(latent, leaf, parents, n_leaves, seed=0, conflicts=None, top_level="compact"):
    """`place_leaves`' objective for the leaves `leaf` [n] of points `latent` [n, D]: (scored, a
    function of assignments [A, K] (leaf i to slot a[i]), larger better; conflicting [A], the
    labelled points each puts under excluded classes; slot_groups(*more columns), the slots
    interchangeable but for the conflicts; rounding, the tolerance and costs, the conflicts'
    part of the score, for `_best_permutation`)."""
    ancestors = leaf_ancestors(parents, n_leaves)
    links = leaf_links(latent, leaf, n_leaves, seed=seed)
    counts = np.bincount(leaf, minlength=n_leaves).astype(float)
    distances = leaf_distances(latent, leaf, n_leaves, seed=seed)
    if top_level == "linkage":
        # no average linkage exceeds the largest distance between two leaves, so the term is in [0, 1]
        scale = TOP_LEVEL_FIRST / max(distances.max(), 1e-12)
        # an assignment with a fragment for a top class (`_too_small`) loses to every other
        top_score = lambda a: (_linkage_scores(distances, counts, ancestors[0], a)  # noqa: E731
                               - distances.max() * _too_small(counts, ancestors[0], a))
        # the graph terms sum to at most len(ancestors) - 2, so one fragment outweighs them all
        fragments = lambda a: len(ancestors) * fragment_classes(counts, ancestors[1:-1], a, MIN_CLASS_SHARE)  # noqa: E731
    else:
        centres = np.array([latent[leaf == k].mean(axis=0) if counts[k] else latent.mean(axis=0)
                            for k in range(n_leaves)])
        # the leaves' own between-class sum of squares bounds the top level's, so its term is in [0, 1]
        scale = TOP_LEVEL_FIRST / max(_tree_scores(centres, counts, ancestors[-1:], np.arange(n_leaves)[None])[0], 1e-12)
        top_score = lambda a: _tree_scores(centres, counts, ancestors[:1], a)  # noqa: E731
        fragments = lambda a: 0.0  # noqa: E731
    conflicts = np.zeros((n_leaves, n_leaves)) if conflicts is None else np.asarray(conflicts, float)
    conflicting = lambda a: conflicts[np.arange(n_leaves), a].sum(axis=1)  # noqa: E731
    below_top = lambda a: (_graph_scores(links, ancestors, a)  # noqa: E731
                           - SPREAD_AFTER_GRAPH * _spread_scores(distances, counts, ancestors[1:-1], a))
    scored = lambda a: (-MARKERS_FIRST * conflicting(a) + scale * top_score(a)  # noqa: E731
                        - fragments(a) + below_top(a))
    rest = lambda a: scale * top_score(a) - fragments(a) + below_top(a)  # noqa: E731
    # The scores read a slot through its classes above the leaf level (and its column of conflicts, a
    # cost the search sets aside), so slots equal in those are interchangeable, but for rounding: the
    # compact top level sums its classes over slots in an order an exchange changes. Its error is
    # within 40 eps of the leaves' uncentred sum of squares (times `scale`), the graph's and the
    # counts' within eps of their sizes; `rounding` bounds the difference of two exchanges 100 times over.
    uncentred = (counts * (centres ** 2).sum(-1)).sum() if top_level == "compact" else 1.0
    rounding = 1e-12 * (scale * uncentred + len(ancestors))
    slot_groups = lambda *more: interchangeable_slots(ancestors[:-1], *more)  # noqa: E731
    # the conflicts are a cost per leaf and slot, which the grouped search sets aside (`_best_permutation`)
    return scored, conflicting, slot_groups, rounding, (rest, MARKERS_FIRST, conflicts)


def place_leaves(latent, leaf, parents, n_leaves, seed=0, markers=None, conflicts=None, top_level="compact"):
    """Re-place a clustering's leaves [n] in the tree's leaf slots: the top level's classes as
    compact as possible (least within-class sum of squares, as `match_to_tree`; top_level
    "linkage": as far apart as possible by average linkage, `_linkage_scores`), and among the
    placements with that top level, every class below it a well-connected region of the cells'
    k-nearest-neighbour graph (`_graph_scores`). Distances decide the top split because its
    classes are separate regions with almost no links between them, so links cannot tell which
    belong together; links decide below, where classes touch and distances mislead: on PBMC naive
    CD4 and naive CD8 T cells lie close but link mostly within their own lineage (NOTES.md).
    Where no link tells two groupings apart (types so distinct that no neighbour link joins two
    leaves), the classes' spread below the top level decides (`_spread_scores`, SPREAD_AFTER_GRAPH).
    The sum of squares gains most by setting a big distinct type apart, so on PBMC it always put
    the NK cells alone under Stem; average linkage, which a class's size does not weigh, sets
    apart the leaf farthest from all others, on PBMC's nine populations mostly the CD34+ cells
    (NOTES.md), unless that makes a top class a fragment (`_too_small`, MIN_TOP_SHARE). With the
    linkage, no class below the top is a fragment either where another placement avoids it
    (`fragment_classes`, MIN_CLASS_SHARE; each costs more than the graph terms can gain): the
    graph cannot tell an isolated fragment from an isolated type, and a type that links a little
    to another keeps more links inside if it joins it and leaves its class to the fragment.

    markers (scores [n, S] of every point for S marker sets, classes [S] as (level, class)): the
    leaves are placed as above first; then, keeping which leaves lie under each marked class's
    relatives (`marker_relatives`), they are re-placed so that every marked class holds the
    relatives' leaves where its markers are highest (`marker_violations`), the rules above deciding
    the rest. Without that hold, a marker could be satisfied by moving a leaf out of its
    relatives into another lineage (Kang: "T cells=CD3D,CD3G" put a T-cell leaf under B cells).

    conflicts [leaf i, slot j] (partial labels, `label_conflicts`): labelled points that slot j would
    put under a class their labels exclude; counted before everything else, so labels hold and only
    the leaves they leave free move (with level-1 labels only, every leaf under a level-1 class).
    Returns the new leaf of every point."""
    latent, leaf = np.asarray(latent, float), np.asarray(leaf)
    ancestors = leaf_ancestors(parents, n_leaves)
    counts = np.bincount(leaf, minlength=n_leaves).astype(float)
    scored, conflicting, slot_groups, rounding, costs = _placement_objective(latent, leaf, parents, n_leaves, seed,
                                                                             conflicts, top_level)
    rest, weight, matrix = costs
    slot = _best_permutation(n_leaves, scored, seed, groups=slot_groups(), tolerance=rounding, costs=costs)
    if markers is not None and len(markers[1]):
        scores, classes = np.asarray(markers[0], float), list(markers[1])
        means = np.array([[scores[leaf == k, s].mean() if counts[k] else -np.inf for k in range(n_leaves)]
                          for s in range(len(classes))])
        relatives = np.array([marker_relatives(ancestors, level, k) for level, k in classes])   # [S, K slots]
        marked = np.array([ancestors[level] == k for level, k in classes])                      # [S, K slots]
        # The hold: the leaves under each set's relatives stay the leaves of one class of that level, not
        # necessarily the same one. Where the tree has two parts of one shape (Kang: Myeloid and
        # Lymphoid, each a three-leaf and a one-leaf class), the graph cannot tell which part is which,
        # and the markers must: held to their slots, "T cells=CD3D,CD3G" re-ordered the monocyte leaves
        # that sat in T's slots.
        held = [(ancestors[coarser], relatives[s][slot]) for s, coarser in
                enumerate(relatives_level(ancestors, level, k) for level, k in classes) if coarser >= 0]
        moved = lambda a: sum((~stays_one_class(row, leaves, a)).astype(float) for row, leaves in held)  # noqa: E731
        # Pair violations alone cannot tell those parts apart (both can be ordered without one), so
        # among placements with as few, the marked classes take the leaves of highest mean score
        # (`marker_shortfall`, below 1, so it never outweighs a violation).
        held_first = lambda a: -MARKERS_FIRST * (MARKERS_FIRST * moved(a) + marker_violations(means, classes, ancestors, a)  # noqa: E731
                                                 + marker_shortfall(means, counts, marked, a))
        slot = _best_permutation(n_leaves, lambda a: -MARKERS_FIRST * (MARKERS_FIRST * (moved(a) + conflicting(a))
                                                                       + marker_violations(means, classes, ancestors, a)
                                                                       + marker_shortfall(means, counts, marked, a))
                                 + scored(a), seed, groups=slot_groups(relatives, marked), tolerance=rounding,
                                 costs=(lambda a: held_first(a) + rest(a), MARKERS_FIRST * MARKERS_FIRST + weight, matrix))
    return slot[leaf]


def same_grouping(ancestors, here, assignments):
    """[A] whether each assignment ([A, K]: leaf i to slot a[i]) groups the leaves as the assignment
    `here` [K] does at every level above the leaves; a renaming of classes (e.g. two lineages of the
    same shape swapped) is the same grouping."""
    same = np.ones(len(assignments), dtype=bool)
    for row in ancestors[:-1]:
        pairs = np.sort(row[here][None, :] * (row.max() + 1) + row[np.asarray(assignments)], axis=1)
        same &= 1 + (np.diff(pairs, axis=1) != 0).sum(axis=1) == len(np.unique(row[here]))
    return same


def nearest_other_grouping(latent, leaf, parents, n_leaves, seed=0, conflicts=None, top_level="compact"):
    """How clearly the leaves `leaf` [n] are grouped, as they are in their slots, by `place_leaves`'
    objective: (margin, other), where `other` [K] (leaf i to slot other[i]) is the best placement
    that groups them differently at some level above the leaves (`same_grouping`) and `margin`
    how much lower it scores. Below the top level the objective is the graph terms, at most
    levels - 2 in all, so a margin of a few thousandths is a tie the latent barely breaks (PBMC's
    CD4 / CD8 T split, NOTES.md). None when the tree allows no other grouping."""
    latent, leaf = np.asarray(latent, float), np.asarray(leaf)
    ancestors = leaf_ancestors(parents, n_leaves)
    here = np.arange(n_leaves)
    scored, _, slot_groups, rounding, (rest, weight, matrix) = _placement_objective(latent, leaf, parents, n_leaves,
                                                                                     seed, conflicts, top_level)
    groups = slot_groups()
    if len(np.unique(groups)) == 1:
        return None
    other_grouping = lambda score: lambda a: np.where(same_grouping(ancestors, here, a), -np.inf, score(a))  # noqa: E731
    other = _best_permutation(n_leaves, other_grouping(scored), seed, groups=groups, tolerance=rounding,
                              costs=(other_grouping(rest), weight, matrix))
    return float(scored(here[None])[0] - scored(other[None])[0]), other


def regrouped_leaves(parents, n_leaves, other):
    """{level (0 = top): leaves that change class} when the leaves move from their slots to `other` [K],
    once the new classes are matched to the old ones by the leaves they share (Hungarian)."""
    moved = {}
    for level, row in enumerate(leaf_ancestors(parents, n_leaves)[:-1]):
        shared = np.zeros((row.max() + 1, row.max() + 1))
        np.add.at(shared, (row, row[other]), 1)
        match = dict(zip(*linear_sum_assignment(-shared)))
        changed = [k for k in range(n_leaves) if match[row[k]] != row[other][k]]
        if changed:
            moved[level] = changed
    return moved


def describe_margin(margin, leaf_names=None, level_names=None):
    """One line for a user: which leaves the nearest other grouping moves, at which level, and how
    much lower it scores (`TreeVAE.placement_margin`)."""
    leaf_names = leaf_names or {}
    named = lambda leaves: [str(leaf_names.get(k, f"leaf {k}")) for k in leaves]  # noqa: E731
    listed = lambda leaves: ", ".join(named(leaves) if len(leaves) <= 6 else      # noqa: E731
                                      named(leaves[:5]) + [f"and {len(leaves) - 5} more"])
    moves = "; ".join(f"{level_names[int(level)] if level_names else f'level {int(level) + 1}'}: " + listed(leaves)
                      for level, leaves in margin["regrouped"].items())
    score = margin["margin"]
    if score >= MARKERS_FIRST / 2:   # the conflicts term: every other grouping breaks labels
        return (f"Nearest other grouping of the leaves ({moves}) puts labelled cells under classes their labels "
                f"exclude: the labels decide the grouping.")
    if score <= -MARKERS_FIRST / 2:  # the run's own leaves break labels (their cells moved in the EM steps)
        return (f"Nearest other grouping of the leaves ({moves}) puts {round(-score / MARKERS_FIRST)} fewer labelled "
                f"cells under classes their labels exclude than this run's grouping, whose leaves the refit's EM "
                f"steps changed after they were placed: the labels prefer the other grouping.")
    if abs(score) < 10 * SPREAD_AFTER_GRAPH:     # the graph terms tie; the spread term is all there is
        return (f"Nearest other grouping of the leaves ({moves}) keeps its neighbour links inside its classes as well as "
                f"this run's grouping: no link tells the two apart, so the classes' spread (distances in the latent) "
                f"decides; marker genes (--markers) or labels at that level settle it.")
    where = (f"{score:.4f} below this run's grouping" if score >= 0 else
             f"{-score:.4f} above this run's grouping (the refit's EM steps moved cells after the leaves were placed)")
    if abs(score) > margin.get("levels", np.inf) - 2 + 1e-6:   # beyond the graph terms' range: top split, fragments
        keeper = "this run's" if score > 0 else "the other"
        return (f"Nearest other grouping of the leaves ({moves}) scores {where} by the placement's top-level split "
                f"and its rule against classes too small to be a type (more than the graph terms can differ): "
                f"{keeper} grouping keeps the larger classes or the farther top split.")
    if abs(score) < NEAR_TIE:
        verdict = (f"a near tie (within {NEAR_TIE}) that the latent's graph barely breaks; marker genes (--markers) "
                   f"or labels at that level settle it")
    else:
        verdict = "the latent prefers this run's grouping" if score > 0 else "the latent prefers the other grouping"
    return f"Nearest other grouping of the leaves ({moves}) scores {where} by the placement's graph terms: {verdict}."


def tree_clustering(latent, parents, n_leaves, per_leaf=1, seed=0, clusters_per_leaf=2, n_init=10, allowed=None,
                    novel=0, placement="compact", grouping_decay=1.0, top_level_decay=1.0, empty_leaves=(),
                    markers=None, top_level="compact"):
    """Nested clustering of latent points [n, D] in the tree's shape: k-means into
    clusters_per_leaf x n_leaves clusters, assigned to leaves by `assign_to_tree` (a cell type that
    k-means splits in two, and two that it merges, are both common: more clusters than leaves let
    the tree's shape decide), then each leaf split by k-means into `per_leaf` components. Returns
    the component of every point [n] (component m belongs to leaf m // per_leaf).

    allowed [n, n_leaves] (partial labels): the assignment first keeps labelled points under
    leaves their labels allow, and a labelled point still under a wrong leaf moves to the nearest
    allowed leaf (by leaf mean). With `novel` leaves (the last ones, for types nobody labelled), a
    cluster without a labelled point where at least NOVEL_EVIDENCE were expected (its size times
    the labelled share) counts as that many misplaced labelled points under a named leaf.

    placement "graph": the leaves, once formed, are re-placed in the tree by the connectivity of
    the latent's neighbour graph (`place_leaves`) instead of staying where compactness put them;
    with labels, only the leaves the labels leave free move (`label_conflicts`): with level-1
    labels only, the leaves under each level-1 class. top_level "linkage" (graph placement only):
    the top level's classes set as far apart as possible by average linkage instead of compactness.

    grouping_decay < 1: the clusters are also grouped with level l's
    compactness counting decay^(l-1) (`coarse_first_weights`), and that grouping is kept if its
    leaves stay nearly as compact (within-leaf sum of squares at most LEAF_TOLERANCE times the
    equal-weight grouping's). With equal weights the leaf level, where splitting a big type gains
    most, can outweigh a wrong lineage above it: on Kang, CD4 T cells split over three leaves put B
    cells under the Myeloid node. With the coarse levels first and no limit, the top level can
    win at the leaves' cost: on PBMC every T cell went into the one-leaf Stem class (NOTES.md).
    top_level_decay < 1: in that coarse-first grouping, the top level's
    classes are fixed first by a grouping with the stronger decay (`coarse_first_grouping`). With
    labels, their penalty holds in both groupings (before 2026-12-05 labelled runs were grouped
    once, levels alike, and a Kang run with level-1 labels put a lymphoid piece in a myeloid leaf).

    empty_leaves: leaves that get no point (a labelled point must be allowed another leaf); the
    clustering is that of the tree without them (`prune_leaves`). Every leaf otherwise takes at least one cluster, so a type too
    rare to find (Kang's 0.8% megakaryocytes) has its slot filled by a piece of another type, and
    at the coarse levels that piece sits in the wrong class (NOTES.md).

    markers (scores [n, S], classes [S] as (level, class); graph placement only): the leaves are
    placed so that marked classes hold their markers' leaves (`place_leaves`), as far as labels
    leave them free."""
    check_choice("leaf placement", placement, LEAF_PLACEMENTS)
    check_choice("top-level split", top_level, TOP_LEVEL_SPLITS)
    if len(empty_leaves):
        pruned, kept = prune_leaves(parents, n_leaves, empty_leaves)
        if allowed is not None:
            stranded = int(stranded_by_empty_leaves(allowed, kept).sum())
            if stranded:
                raise ValueError(f"{stranded} labelled points are allowed only empty leaves {list(empty_leaves)}; "
                                 f"a labelled type is there, so its leaf cannot be left empty.")
            allowed = np.asarray(allowed)[:, kept]
        if markers is not None:
            markers = _pruned_markers(markers, parents, n_leaves, pruned, kept)
        component = tree_clustering(latent, pruned, len(kept), per_leaf, seed, clusters_per_leaf, n_init, allowed,
                                    novel, placement, grouping_decay, top_level_decay, markers=markers,
                                    top_level=top_level)
        return kept[component // per_leaf] * per_leaf + component % per_leaf
    fit = KMeans(n_clusters=clusters_per_leaf * n_leaves, n_init=n_init, random_state=seed).fit(latent)
    counts = np.bincount(fit.labels_, minlength=clusters_per_leaf * n_leaves)
    penalty = None
    if allowed is not None:
        labelled = ~np.asarray(allowed).all(axis=1)
        onehot = np.eye(len(counts))[fit.labels_[labelled]]                    # [n_labelled, K]
        penalty = onehot.T @ (~np.asarray(allowed)[labelled]).astype(float)     # [K, n_leaves]
        if novel:
            expected = counts * labelled.mean()
            unexplained = (onehot.sum(axis=0) == 0) & (expected >= NOVEL_EVIDENCE)
            penalty[unexplained, :n_leaves - novel] += expected[unexplained, None]
    leaf = assign_to_tree(fit.cluster_centers_, counts, parents, n_leaves, seed, penalty=penalty)[fit.labels_]
    if min(grouping_decay, top_level_decay) < 1:
        coarse = coarse_first_grouping(fit.cluster_centers_, counts, parents, n_leaves, seed, grouping_decay,
                                       top_level_decay, labels_penalty=penalty)[fit.labels_]
        if _within_leaves(latent, coarse) <= LEAF_TOLERANCE * _within_leaves(latent, leaf):
            leaf = coarse
    if allowed is not None:
        leaf = _move_labelled(latent, leaf, np.asarray(allowed), n_leaves)
    if placement == "graph":
        conflicts = None if allowed is None else label_conflicts(leaf, np.asarray(allowed), n_leaves, novel)
        leaf = place_leaves(latent, leaf, parents, n_leaves, seed, markers=markers, conflicts=conflicts,
                            top_level=top_level)
        if markers is not None and len(markers[1]):
            leaf = regroup_by_markers(latent, leaf, fit.labels_, parents, n_leaves, markers, seed, allowed)
            if allowed is not None:
                leaf = _move_labelled(latent, leaf, np.asarray(allowed), n_leaves)
    if per_leaf == 1:
        return leaf
    component = leaf * per_leaf
    for k in range(n_leaves):
        members = np.flatnonzero(leaf == k)
        if len(members) >= per_leaf:
            sub = KMeans(n_clusters=per_leaf, n_init=n_init, random_state=seed).fit(latent[members]).labels_
            component[members] += sub
    return component


def high_group(values, weights):
    """[P] bool: the pieces on the high side of the cut of 1-D `values` (weighted by `weights`) with
    the least within-side sum of squares (k-means with two groups, exact in one dimension); None
    when every value is the same (nothing to cut)."""
    values, weights = np.asarray(values, float), np.asarray(weights, float)
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    if len(v) < 2 or v[0] == v[-1]:
        return None
    sums, squares, mass = np.cumsum(w * v), np.cumsum(w * v * v), np.cumsum(w)
    left = squares[:-1] - sums[:-1] ** 2 / mass[:-1]
    right = (squares[-1] - squares[:-1]) - (sums[-1] - sums[:-1]) ** 2 / (mass[-1] - mass[:-1])
    cuts = np.flatnonzero(v[1:] > v[:-1])                 # a cut between two equal values splits nothing
    cut = cuts[np.argmin((left + right)[cuts])] + 1
    high = np.zeros(len(v), dtype=bool)
    high[order[cut:]] = True
    return high


def marker_presence(score, piece, n_pieces):
    """[P] each piece's mean marker score (cells' scores [n], piece [n]) on a log scale, as fold
    changes, with OFF_SCORE added: what `regroup_by_markers` cuts pieces by."""
    sizes = np.maximum(np.bincount(piece, minlength=n_pieces), 1)
    return np.log(np.bincount(piece, weights=np.asarray(score, float), minlength=n_pieces) / sizes + OFF_SCORE)


def regroup_by_markers(latent, leaf, piece, parents, n_leaves, markers, seed=0, allowed=None):
    """Move whole k-means pieces across a marked class's border where the leaves mix two types.

    `place_leaves` moves whole leaves, so a leaf holding two types on either side of a marked split
    stays mixed (Kang: CD8 T and NK cells share a leaf in every fold, and "T cells=CD3D,CD3G" can
    only move that leaf whole). Here the pieces (piece [n], the k-means clusters the leaves were
    grouped from) under each marked class's relatives (`marker_relatives`) are cut in two by their
    mean marker score on a log scale (`marker_presence`, `high_group`; Kang validation level 3 0.798
    against 0.774 for the share of cells with a marker detected, PBMC level); a high piece outside the class, or a low piece inside it,
    moves to the nearest leaf (by mean) on its side, and every class just above the leaves that
    took a high piece (or lost a whole leaf) forms its leaves again from its pieces by compactness
    (`assign_to_tree`), so a type moved in can get a leaf of its own; re-forming the other side too
    cost PBMC's level 4 (the CD4 T leaves). Pieces with labelled points stay (labels come first);
    a set whose move would leave a class with fewer pieces than leaves is skipped, and so is a
    top-level class (its relatives are every leaf): on PBMC, "CD34 HSC=PRSS57,SPINK2" moved the
    CD34-sorted cells that look like B or myeloid cells out, level 1 -0.05 and level 4 -0.04 over
    5 folds (NOTES.md). Returns the new leaf of every point [n]."""
    latent, leaf, piece = np.asarray(latent, float), np.asarray(leaf), np.asarray(piece)
    ancestors = leaf_ancestors(parents, n_leaves)
    scores, classes = np.asarray(markers[0], float), list(markers[1])
    n_pieces = piece.max() + 1
    sizes = np.bincount(piece, minlength=n_pieces).astype(float)
    present = np.flatnonzero(sizes)
    per_piece = lambda values: np.bincount(piece, weights=values, minlength=n_pieces)  # noqa: E731  (sums, no [n, P] array)
    in_leaves = np.stack([per_piece((leaf == j).astype(float)) for j in range(n_leaves)], axis=1)  # [P, n_leaves]
    slot = np.where(sizes > 0, in_leaves.argmax(axis=1), -1)
    centres = np.stack([per_piece(latent[:, d]) for d in range(latent.shape[1])], axis=1) / np.maximum(sizes, 1)[:, None]
    fixed = np.zeros(n_pieces, dtype=bool)
    penalty = None
    if allowed is not None:
        allowed = np.asarray(allowed, bool)
        labelled = ~allowed.all(axis=1)
        fixed = per_piece(labelled.astype(float)) > 0
        penalty = np.stack([per_piece((labelled & ~allowed[:, j]).astype(float)) for j in range(n_leaves)], axis=1)
    above = ancestors[-2] if len(ancestors) > 1 else np.zeros(n_leaves, dtype=int)
    for s, (level, k) in enumerate(classes):
        if relatives_level(ancestors, level, k) < 0:
            continue
        region, marked = marker_relatives(ancestors, level, k), ancestors[level] == k
        pieces = present[region[slot[present]]]
        high = high_group(marker_presence(scores[:, s], piece, n_pieces)[pieces], sizes[pieces])
        if high is None:
            continue
        wrong = (high != marked[slot[pieces]]) & ~fixed[pieces]
        if not wrong.any():
            continue
        moved = slot.copy()
        leaf_means = {j: np.average(centres[pieces][slot[pieces] == j], axis=0, weights=sizes[pieces][slot[pieces] == j])
                      for j in np.unique(slot[pieces])}
        for p, is_high in zip(pieces[wrong], high[wrong]):
            # the nearest leaf of its side that holds pieces, else the side's first slot
            side = [j for j in leaf_means if marked[j] == is_high] or [np.flatnonzero(region & (marked == is_high))[0]]
            moved[p] = min(side, key=lambda j: ((centres[p] - leaf_means.get(j, centres[p])) ** 2).sum())
        # the marked side's classes that took pieces form their leaves again (a type moved in may get a
        # leaf of its own); elsewhere a piece joins its nearest leaf, unless a leaf was left empty
        emptied = np.setdiff1d(np.unique(slot[pieces]), moved[pieces])
        changed = np.unique(np.concatenate([above[moved[pieces][wrong & high]], above[emptied]]))
        feasible = True
        for c in changed:
            slots = np.flatnonzero(above == c)
            members = present[np.isin(moved[present], slots)]
            if len(members) < len(slots):
                feasible = False
                break
            if len(slots) > 1:
                sub_penalty = None if penalty is None else penalty[np.ix_(members, slots)]
                grouped = assign_to_tree(centres[members], sizes[members], [[0] * len(slots)], len(slots), seed,
                                         penalty=sub_penalty)
                moved[members] = slots[grouped]
        if feasible:
            slot = moved
    return slot[piece]


def marker_sides(leaf, parents, n_leaves, classes):
    """[n, n_leaves] bool: the leaves each point (in leaves `leaf` [n]) may take so that it stays on
    its side of every marked class (classes [S] as (level, class)) among that class's relatives:
    the final refit's EM steps follow the latent's geometry, which on Kang does not hold the CD8 T /
    NK split that the markers made (`regroup_by_markers`), and undid it (NOTES.md)."""
    ancestors = leaf_ancestors(parents, n_leaves)
    allowed = np.ones((len(leaf), n_leaves), dtype=bool)
    for level, k in classes:
        relatives, marked = marker_relatives(ancestors, level, k), ancestors[level] == k
        inside = relatives[leaf]
        allowed[inside] &= relatives[None, :] & (marked[None, :] == marked[leaf[inside]][:, None])
    return allowed


def _pruned_markers(markers, parents, n_leaves, pruned, kept):
    """Marker sets with their classes renumbered in the tree without some leaves (`prune_leaves`);
    a set whose class lost every leaf is dropped (nothing left to place under it)."""
    scores, classes = markers
    before, after = leaf_ancestors(parents, n_leaves)[:, kept], leaf_ancestors(pruned, len(kept))
    keep, renamed = [], []
    for s, (level, k) in enumerate(classes):
        under = np.flatnonzero(before[level] == k)
        if len(under):
            keep.append(s)
            renamed.append((level, int(after[level][under[0]])))
    return np.asarray(scores)[:, keep], renamed


def coarse_first_grouping(centres, counts, parents, n_leaves, seed=0, grouping_decay=1.0, top_level_decay=1.0,
                          labels_penalty=None):
    """Clusters (centres [K, D], sizes [K]) grouped into leaves with the coarse levels first:
    with top_level_decay < 1, a grouping whose level l counts top_level_decay^(l-1) fixes each
    cluster's top-level class, and the levels below are then grouped inside those classes with
    level l counting grouping_decay^(l-1). A strong decay is what gets the lineages right (the top
    level), and a mild one what keeps the finer classes whole: with decay 0.5 for every level,
    PBMC's CD4 / CD8 split went wrong in more runs (NOTES.md). `labels_penalty` [K, n_leaves] (as
    in `assign_to_tree`) holds in both steps, so labels come before compactness in each. Returns
    leaf_of_cluster [K]."""
    n_levels = len(parents) + 1
    penalty = labels_penalty
    if top_level_decay < 1:
        first = assign_to_tree(centres, counts, parents, n_leaves, seed, penalty=labels_penalty,
                               level_weights=coarse_first_weights(n_levels, top_level_decay))
        top = leaf_ancestors(parents, n_leaves)[0]
        penalty = (top[None, :] != top[first][:, None]) * np.asarray(counts, float)[:, None]
        if labels_penalty is not None:
            penalty = penalty + labels_penalty
    return assign_to_tree(centres, counts, parents, n_leaves, seed, penalty=penalty,
                          level_weights=coarse_first_weights(n_levels, grouping_decay))


def _within_leaves(latent, leaf):
    """Within-leaf sum of squares of points [n, D] in leaves [n]."""
    return sum(((latent[leaf == k] - latent[leaf == k].mean(axis=0)) ** 2).sum() for k in np.unique(leaf))


def stranded_by_empty_leaves(allowed, kept):
    """[n] bool: the points (allowed [n, leaves]) whose labels allow none of the `kept` leaves, i.e.
    only leaves to be left empty: their type is in the data, so its leaf cannot be empty."""
    return ~np.asarray(allowed)[:, kept].any(axis=1)


def label_conflicts(leaf, allowed, n_leaves, novel=0):
    """[n_leaves, n_leaves]: how many labelled points of leaf i (points [n] in leaves `leaf`, allowed
    [n, n_leaves]) their labels exclude from slot j, so that re-placing leaves (`place_leaves`)
    never moves labelled cells out of their classes; the last `novel` slots (types nobody
    labelled) and the named ones never trade leaves (a count above any leaf's)."""
    conflicts = np.eye(n_leaves)[leaf].T @ (~allowed).astype(float)
    is_novel = np.arange(n_leaves) >= n_leaves - novel
    conflicts[is_novel[:, None] != is_novel[None, :]] += len(leaf) + 1.0
    return conflicts


def _move_labelled(latent, leaf, allowed, n_leaves):
    """Put each labelled point whose leaf its labels exclude under the nearest allowed leaf."""
    wrong = ~allowed[np.arange(len(leaf)), leaf]
    if not wrong.any():
        return leaf
    means = np.array([latent[leaf == k].mean(axis=0) if (leaf == k).any() else latent.mean(axis=0)
                      for k in range(n_leaves)])
    distance = ((latent[wrong][:, None, :] - means[None]) ** 2).sum(-1)
    distance[~allowed[wrong]] = np.inf
    leaf = leaf.copy()
    leaf[wrong] = distance.argmin(axis=1)
    return leaf

