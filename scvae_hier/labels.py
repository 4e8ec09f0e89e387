"""Partial labels: which class each cell is known to have at each level of the hierarchy.

A cell may be labelled at any level or none: codes [n_cells, n_levels] hold the class index
(into `Hierarchy.classes(level)`) or UNLABELLED (-1). A fine label implies every coarser one
through the hierarchy, so codes are completed upwards, and a coarse label that disagrees with a
finer one is an error naming the cells. Experiments hide labels with `reveal`: a seeded,
stratified share of cells keeps its label at a chosen level.
"""
import numpy as np
import pandas as pd

from .hierarchy import HierarchyError

UNLABELLED = -1
MISSING_NAMES = ("", "nan", "none")  # read as unlabelled besides the user's unlabelled category


def missing_labels(values: pd.Series, unlabelled_category=None) -> np.ndarray:
    """[n] bool: cells without a label in this column (NaN, empty, "nan", "none" or the category)."""
    text = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    missing = text.str.lower().isin(MISSING_NAMES).to_numpy()
    if unlabelled_category is not None:
        missing |= (text == str(unlabelled_category)).to_numpy()
    return missing


def fill_true_leaf_labels(obs, hierarchy, options) -> np.ndarray:
    """[n] bool: the cells with a true leaf label to score a run against. Every cell for a run
    without holes (a label outside the hierarchy is refused where it is scored). A run trained on
    labels with holes (`options["semi_supervised"]`): the cells with a leaf label, or per-level labels
    (`options["levels"]`) that leave one leaf open (a cell labelled "B cells" at level 2 when that
    class has one leaf, or with a class no cell is labelled below, its own leaf, `Hierarchy.from_obs`);
    obs's label column is set to those leaves in place (NaN where none), so that what reads the
    column scores the same cells."""
    if not options.get("semi_supervised"):
        return np.ones(len(obs), bool)
    column = obs[hierarchy.label_column]
    truth = np.where(missing_labels(column, options.get("unlabelled_category")), "", column.astype(str)).astype(object)
    levels = list(options.get("levels") or ())
    if levels and all(level in obs for level in levels) and (truth == "").any():  # (another file may lack them)
        codes = label_codes(obs, hierarchy, levels, options.get("unlabelled_category"))
        truth[truth == ""] = implied_leaves(codes[truth == ""], hierarchy)
    scored = truth != ""
    obs[hierarchy.label_column] = pd.Categorical(np.where(scored, truth, None))
    return scored


def allowed_leaves(codes, hierarchy) -> np.ndarray:
    """[n, n_leaves] bool: the leaves (in the order of `hierarchy.paths`) that each cell's labelled
    levels (codes [n, L]) leave open."""
    return allowed_components(codes, hierarchy.level_codes(list(hierarchy.paths)).T)


def implied_leaves(codes, hierarchy) -> np.ndarray:
    """[n] the leaf label of each cell whose labelled levels (codes [n, L]) leave one leaf open, else ""."""
    leaves = np.array(list(hierarchy.paths), dtype=object)
    allowed = allowed_leaves(codes, hierarchy)
    one = (np.asarray(codes) >= 0).any(axis=1) & (allowed.sum(axis=1) == 1)
    return np.where(one, leaves[allowed.argmax(axis=1)], "").astype(object)


def _check_category(hierarchy, unlabelled_category):
    if unlabelled_category is None:
        return
    for level in hierarchy.levels:
        if str(unlabelled_category) in hierarchy.classes(level):
            raise HierarchyError(f"The unlabelled category {unlabelled_category!r} is also a class of level {level!r}; "
                                 f"choose another unlabelled category (--unlabelled-category).")


def label_codes(obs, hierarchy, columns=None, unlabelled_category="Unknown") -> np.ndarray:
    """Codes [n, L] of the labels in `obs`: per-level `columns` (coarse to fine, each may have holes)
    or else the hierarchy's label column (a missing leaf label leaves the cell unlabelled at every
    level). Names not in the hierarchy are refused with their counts; codes are completed upwards."""
    _check_category(hierarchy, unlabelled_category)
    n = len(obs)
    codes = np.full((n, hierarchy.n_levels), UNLABELLED, dtype=int)
    if columns:
        columns = list(columns)
        if len(columns) != hierarchy.n_levels:
            raise HierarchyError(f"{len(columns)} label columns {columns} for a {hierarchy.n_levels}-level hierarchy "
                                 f"{hierarchy.levels}; give one column per level, coarse to fine.")
        for level, column in enumerate(columns):
            _codes_of(obs, column, hierarchy.classes(level), unlabelled_category, codes[:, level],
                      f"level {hierarchy.levels[level]!r}")
    else:
        column = hierarchy.label_column
        leaf = np.full(n, UNLABELLED, dtype=int)
        _codes_of(obs, column, list(hierarchy.paths), unlabelled_category, leaf, "the hierarchy")
        labelled = leaf >= 0
        paths = list(hierarchy.paths.values())
        for level in range(hierarchy.n_levels):
            index = {c: i for i, c in enumerate(hierarchy.classes(level))}
            table = np.array([index[p[level]] for p in paths])
            codes[labelled, level] = table[leaf[labelled]]
    return complete(codes, hierarchy, obs.index)


def _codes_of(obs, column, names, unlabelled_category, out, where):
    if column not in obs.columns:
        raise HierarchyError(f"obs has no label column {column!r}; available columns: {list(obs.columns)}")
    values = obs[column]
    missing = missing_labels(values, unlabelled_category)
    text = values.astype(str).to_numpy()
    position = pd.Index(names).get_indexer(text)
    unknown = (~missing) & (position < 0)
    if unknown.any():
        counts = pd.Series(text[unknown]).value_counts()
        shown = ", ".join(f"{name!r} ({count} cells)" for name, count in counts.head(10).items())
        raise HierarchyError(f"obs[{column!r}] has {len(counts)} label(s) that are not classes of {where}: {shown}. "
                             f"Fix the labels or the hierarchy, or mark unlabelled cells as NaN or "
                             f"{unlabelled_category!r}.")
    out[~missing] = position[~missing]


def complete(codes, hierarchy, cell_names=None) -> np.ndarray:
    """Fill coarse levels from finer labels; refuse a coarse label that is not the fine label's
    ancestor, naming the cells."""
    codes = np.array(codes, dtype=int, copy=True)
    names = np.asarray(cell_names if cell_names is not None else np.arange(len(codes))).astype(str)
    for level in range(hierarchy.n_levels - 1, 0, -1):
        parent_of = hierarchy.parent_index(level)
        known = codes[:, level] >= 0
        parents = np.where(known, parent_of[np.maximum(codes[:, level], 0)], UNLABELLED)
        clash = known & (codes[:, level - 1] >= 0) & (codes[:, level - 1] != parents)
        if clash.any():
            rows = np.flatnonzero(clash)
            coarse, fine = hierarchy.classes(level - 1), hierarchy.classes(level)
            shown = "; ".join(f"{names[r]}: {fine[codes[r, level]]!r} under {coarse[codes[r, level - 1]]!r}"
                              for r in rows[:5])
            raise HierarchyError(
                f"{len(rows)} cell(s) have a {hierarchy.levels[level]!r} label that is not under their "
                f"{hierarchy.levels[level - 1]!r} label ({shown}{' ...' if len(rows) > 5 else ''}); in the hierarchy "
                f"{fine[codes[rows[0], level]]!r} is under {coarse[parent_of[codes[rows[0], level]]]!r}. Correct one "
                f"of the two labels, or leave one of them unlabelled.")
        fill = known & (codes[:, level - 1] < 0)
        codes[fill, level - 1] = parents[fill]
    return codes


def parse_reveal(specs, hierarchy) -> list:
    """[(level index, fraction)] from "LEVEL=FRACTION" strings (LEVEL a level name or 1-based number)."""
    out = []
    for spec in specs:
        level, sep, fraction = str(spec).partition("=")
        if not sep:
            raise ValueError(f"--labelled takes LEVEL=FRACTION (e.g. {hierarchy.levels[-1]}=0.05), got {spec!r}.")
        if level.isdigit():
            index = int(level) - 1
            if not 0 <= index < hierarchy.n_levels:
                raise ValueError(f"--labelled {spec}: level {level} does not exist; levels are 1..{hierarchy.n_levels} "
                                 f"({', '.join(hierarchy.levels)}).")
        elif level in hierarchy.levels:
            index = hierarchy.levels.index(level)
        else:
            raise ValueError(f"--labelled {spec}: no level named {level!r}; levels are {hierarchy.levels} "
                             f"(or their numbers 1..{hierarchy.n_levels}).")
        try:
            share = float(fraction)
        except ValueError:
            raise ValueError(f"--labelled {spec}: {fraction!r} is not a fraction between 0 and 1.") from None
        if not 0 < share <= 1:
            raise ValueError(f"--labelled {spec}: the fraction must be in (0, 1], got {share}.")
        out.append((index, share))
    return out


def reveal(codes, plan, strata, seed=0) -> np.ndarray:
    """Hide every label except, for each (level, fraction) of `plan`, a seeded share of the cells
    stratified by `strata` (e.g. the finest true class: every class keeps round(fraction x size)
    labelled cells, at least one), labelled at that level (and so at its ancestors)."""
    shown = np.full_like(codes, UNLABELLED)
    rng = np.random.default_rng(seed)
    strata = np.asarray(strata)
    for level, fraction in plan:
        for value in np.unique(strata):
            members = np.flatnonzero((strata == value) & (codes[:, level] >= 0))
            if not len(members):
                continue
            chosen = rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False)
            shown[chosen, :level + 1] = codes[chosen, :level + 1]
    return shown


def allowed_components(codes, component_ancestors) -> np.ndarray:
    """[n, M] bool: the components whose class at every labelled level is the cell's label."""
    codes = np.asarray(codes)
    ancestors = np.asarray(component_ancestors)  # [L, M]
    allowed = np.ones((len(codes), ancestors.shape[1]), dtype=bool)
    for level in range(ancestors.shape[0]):
        known = codes[:, level:level + 1] >= 0
        allowed &= ~known | (ancestors[level][None, :] == codes[:, level:level + 1])
    return allowed
