"""Naming a tree-shaped clustering made without labels by the labels (TreeVAE's final refit,
`label_grouping="named"`).

A clustering in the hierarchy's shape made without labels fixes which cells go together at every
level, but not which class is which: any symmetry of the tree (exchanging two sibling subtrees of
the same shape) gives the same grouping under other names. The labels pick the names: the
symmetry that leaves the fewest labelled cells under a leaf their labels exclude. It is found
exactly, bottom-up: two subtrees of the same shape are matched at the least cost of matching their
children (an assignment problem within each set of same-shaped children), so no symmetry is
enumerated, however many there are. Among namings with as few conflicts, the leaves keep the
names the label-free clustering gave them (a renaming costs less than one conflict in all).
"""
import numpy as np
from scipy.optimize import linear_sum_assignment

from .supervision import leaf_ancestors


def tree_children(parents, n_leaves):
    """children[level][class]: the classes one level below (leaves at the last level) of every
    class, level 0 holding the root's children (the top level's classes)."""
    ancestors = leaf_ancestors(parents, n_leaves)
    children = [[list(range(ancestors[0].max() + 1))]]
    for level, links in enumerate(parents):
        below = [[] for _ in range(ancestors[level].max() + 1)]
        for child, parent in enumerate(links):
            below[parent].append(child)
        children.append(below)
    return children


def subtree_shapes(children):
    """shape[level][class]: a hashable description of the subtree under each class (level 0: the
    root), equal exactly when two subtrees are the same up to the order of their children."""
    shapes = [None] * len(children)
    for level in reversed(range(len(children))):
        below = shapes[level + 1] if level + 1 < len(children) else None
        shapes[level] = [tuple(sorted(below[c] for c in kids)) if below is not None else (len(kids),)
                         for kids in children[level]]
    return shapes


def least_conflict_naming(parents, n_leaves, conflicts):
    """The symmetry of the tree that names a label-free clustering's leaves with the fewest
    conflicts: conflicts [n_leaves, n_leaves] (labelled cells of leaf i that their labels exclude
    from leaf j, `tree.label_conflicts`). Returns (naming [n_leaves]: the leaf each leaf is renamed
    to, a permutation preserving every level's grouping; its total conflicts)."""
    conflicts = np.asarray(conflicts, float)
    costs = conflicts + (1 - np.eye(n_leaves)) / (n_leaves + 1)     # ties: every leaf keeps its name
    children = tree_children(parents, n_leaves)
    shapes = subtree_shapes(children)
    depth = len(children)

    def match(level, a, b):
        """(cost, {leaf under a: leaf under b}) of the best match of class a onto class b (same shape);
        level = len(children) matches leaves."""
        if level == depth:
            return costs[a, b], {a: b}
        cost, naming = 0.0, {}
        kids_a, kids_b = children[level][a], children[level][b]
        for shape in set(shapes[level + 1][k] if level + 1 < depth else None for k in kids_a):
            left = [k for k in kids_a if level + 1 == depth or shapes[level + 1][k] == shape]
            right = [k for k in kids_b if level + 1 == depth or shapes[level + 1][k] == shape]
            found = [[match(level + 1, i, j) for j in right] for i in left]
            rows, cols = linear_sum_assignment(np.array([[c for c, _ in row] for row in found]))
            for i, j in zip(rows, cols):
                cost += found[i][j][0]
                naming.update(found[i][j][1])
        return cost, naming

    naming = match(0, 0, 0)[1]
    naming = np.array([naming[k] for k in range(n_leaves)])
    return naming, int(conflicts[np.arange(n_leaves), naming].sum())
