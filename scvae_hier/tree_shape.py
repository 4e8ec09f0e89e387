"""The hierarchy as a tree of class indices (numpy only, so that clustering code and analyses can
use it without loading TensorFlow): parent links per level, each leaf's ancestors, and how much
each level's offset counts in a component's mean."""
import numpy as np

TREE_SHRINK = 0.5  # each level's offsets count half as much as its parent level's


def default_parents(level_sizes):
    """A tree for bare level sizes (no hierarchy): children split evenly over parents, in order."""
    return [[c * k_parent // k for c in range(k)] for k_parent, k in zip(level_sizes, level_sizes[1:])]


def check_parents(parents, level_sizes):
    """Every class of level l > 1 has one parent of level l - 1, and every class has a child."""
    if len(parents) != len(level_sizes) - 1:
        raise ValueError(f"parents gives {len(parents)} levels of parent links; a {len(level_sizes)}-level tree "
                         f"needs {len(level_sizes) - 1}.")
    for level, (links, k_parent, k) in enumerate(zip(parents, level_sizes, level_sizes[1:]), start=2):
        links = np.asarray(links, dtype=int)
        if links.shape != (k,) or links.min() < 0 or links.max() >= k_parent:
            raise ValueError(f"Level {level}: parents must give each of its {k} classes a parent in 0..{k_parent - 1}, "
                             f"got {list(links)}.")
        childless = sorted(set(range(k_parent)) - set(links.tolist()))
        if childless:
            raise ValueError(f"Level {level - 1} class(es) {childless} have no child at level {level}; every class "
                             f"of a tree needs at least one leaf below it.")


def leaf_ancestors(parents, n_leaves):
    """[L, K_L] array: the class at each level (coarse to fine) of every leaf. parents[l - 1]
    gives the parent (at level l - 1) of every class of level l."""
    rows = [np.arange(n_leaves)]
    for links in reversed(parents):
        rows.insert(0, np.asarray(links, dtype=int)[rows[0]])
    return np.stack(rows)


def class_ancestors(parents, level_sizes):
    """Per level l (0-based): [l + 1, K_l], the class at levels 0..l of every class of level l."""
    return [leaf_ancestors(parents[:level], k) for level, k in enumerate(level_sizes)]
