"""Cell-type hierarchies: which class each leaf label belongs to at every level.

A hierarchy is data, not code. It maps every leaf label (a value of an obs column such as
`source_library`) to a path of class names, one per level, coarse to fine. The order in which
paths are given fixes the order of the classes at each level, and so the integer codes that
models and metrics use.
"""
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np


class HierarchyError(ValueError):
    """A hierarchy definition is malformed or does not fit the data."""


def _names(values):
    """Plain Python strings from lists, tuples or the numpy arrays that h5ad gives back."""
    return [str(v) for v in values]


def _coarse_only_paths(obs, columns, unlabelled_category=None) -> dict:
    """Paths for the classes that cells are labelled with at a coarse level but that no cell is
    labelled below: such a class is its own leaf, its name repeated down to the finest level (as
    "B cells" at levels 2-4 of a tree whose B cells have no subtypes), under the ancestors its cells
    name. Without it the class would have no path and its labels would be refused. Finest level
    first, so a class that gains a child this way is not also made a leaf."""
    from .labels import missing_labels  # labels builds on this module
    given = np.column_stack([~missing_labels(obs[c], unlabelled_category) for c in columns])
    text = np.column_stack([obs[c].astype(str).to_numpy() for c in columns])
    below = np.zeros_like(given)  # labelled at some finer level
    for level in range(len(columns) - 2, -1, -1):
        below[:, level] = below[:, level + 1] | given[:, level + 1]
    paths = {}
    for level in range(len(columns) - 2, -1, -1):
        has_child = set(text[given[:, level] & below[:, level], level]) | {p[level] for p in paths.values()}
        for name in dict.fromkeys(text[given[:, level], level]):
            if name in has_child:
                continue
            rows = given[:, level] & (text[:, level] == name) & given[:, :level].all(axis=1)
            prefixes = list(dict.fromkeys(map(tuple, text[rows, :level])))
            if len(prefixes) != 1:
                n_cells = int((given[:, level] & (text[:, level] == name)).sum())
                raise HierarchyError(
                    f"class {name!r} of level {columns[level]!r} ({n_cells} cells) has no finer label, so it is its "
                    f"own leaf, but its place in the tree is "
                    + (f"ambiguous: its cells name {len(prefixes)} different paths above it, {[list(p) for p in prefixes]}. "
                       f"Fix those cells' coarse labels." if prefixes else
                       f"unknown: no cell labelled {name!r} is labelled at every coarser level {columns[:level]}. "
                       f"Label them on at least one such cell."))
            paths[name] = (*prefixes[0], *[name] * (len(columns) - level))
    return paths


class Hierarchy:
    """A cell-type hierarchy: levels (coarse->fine), the classes per level, and each leaf label's path."""

    def __init__(self, label_column, levels, paths):
        self.label_column = str(label_column)
        self.levels = _names(levels)
        self.paths = {str(label): tuple(_names(path)) for label, path in paths.items()}
        self._check()
        self._classes = [list(dict.fromkeys(p[l] for p in self.paths.values()))
                         for l in range(self.n_levels)]
        self._index = [{c: i for i, c in enumerate(cs)} for cs in self._classes]
        # Derived once: each class's parent (per level; level 0 has none) and every name above a class.
        self._parent_of = [{}] + [{p[l]: p[l - 1] for p in self.paths.values()} for l in range(1, self.n_levels)]
        self._above = {}
        for path in self.paths.values():
            for depth, name in enumerate(path):
                self._above.setdefault(name, set()).update(path[:depth + 1])

    def _check(self):
        if not self.label_column.strip():
            raise HierarchyError("the hierarchy's label column name is empty")
        if not self.levels:
            raise HierarchyError("a hierarchy needs at least one level")
        if any(not name.strip() for name in self.levels):
            raise HierarchyError(f"empty level name in levels {self.levels}")
        repeated = [n for n, c in Counter(self.levels).items() if c > 1]
        if repeated:
            raise HierarchyError(f"level names must be unique; repeated: {repeated}")
        if not self.paths:
            raise HierarchyError("a hierarchy needs at least one label with a path")
        for label, path in self.paths.items():
            if not label.strip():
                raise HierarchyError("empty leaf label in the hierarchy")
            if len(path) != len(self.levels):
                raise HierarchyError(
                    f"label {label!r} has {len(path)} classes {list(path)} but the hierarchy "
                    f"has {len(self.levels)} levels {self.levels}")
            if any(not c.strip() for c in path):
                raise HierarchyError(f"label {label!r} has an empty class name in {list(path)}")
        # Each class must sit under exactly one parent, or the levels are not a tree.
        for l in range(1, len(self.levels)):
            parents = {}
            for path in self.paths.values():
                parents.setdefault(path[l], []).append(path[l - 1])
            for child, ps in parents.items():
                ps = list(dict.fromkeys(ps))
                if len(ps) > 1:
                    raise HierarchyError(
                        f"levels do not nest: class {child!r} of level {self.levels[l]!r} has "
                        f"{len(ps)} parents at level {self.levels[l - 1]!r}: {ps}. Give it one "
                        f"parent, or use different class names under each parent.")

    # -- structure -----------------------------------------------------------------------

    @property
    def n_levels(self):
        return len(self.levels)

    @property
    def sizes(self):
        """Number of classes K_l at each level."""
        return [len(cs) for cs in self._classes]

    def _level(self, level):
        """0-based index of a level given by index (negative allowed) or by name."""
        if isinstance(level, str):
            if level not in self.levels:
                raise HierarchyError(f"unknown level {level!r}; levels are {self.levels}")
            return self.levels.index(level)
        index = int(level)
        if not -self.n_levels <= index < self.n_levels:
            raise HierarchyError(f"level {level} out of range for {self.n_levels} levels")
        return index % self.n_levels

    def classes(self, level):
        """Class names of one level, in order of first appearance in the paths."""
        return list(self._classes[self._level(level)])

    def parent_index(self, level):
        """For each class of `level` (>= 1), the index of its parent in classes(level - 1)."""
        l = self._level(level)
        if l == 0:
            raise HierarchyError("the first level has no parents")
        return np.array([self._index[l - 1][self._parent_of[l][c]] for c in self._classes[l]], dtype=int)

    def siblings(self, classes) -> list:
        """The other classes under the same parent as `classes` (at the finest level that has them
        all); for an only child, its parent's siblings, and so on up (CD19+ B, alone under B cell,
        meets the other lineages); [] where no level has them all, or they span parents."""
        holding = [l for l in range(self.n_levels) if set(classes) <= set(self._classes[l])]
        if not holding:
            return []
        level, current = holding[-1], set(classes)
        while level > 0:
            names, parent_of = self._classes[level], self._parent_of[level]
            parents = {parent_of[c] for c in current}
            if len(parents) > 1:
                return []
            siblings = [c for c in names if c not in current and parent_of[c] in parents]
            if siblings:
                return siblings
            level, current = level - 1, parents
        return [c for c in self._classes[0] if c not in current]

    def under(self, values, names) -> np.ndarray:
        """Boolean per value: it is one of `names`, or one of them is above it in the tree (a
        level-3 "CD8 T" is under the level-2 "T cell"). Values outside the hierarchy match by name."""
        names = set(names)
        unique, inverse = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
        return np.array([bool(self._above.get(v, {v}) & names) for v in unique], dtype=bool)[inverse.ravel()]

    # -- labels --------------------------------------------------------------------------

    def validate(self, labels):
        """Raise HierarchyError if some labels have no path (they could not be trained on)."""
        counts = Counter(_names(np.asarray(labels, dtype=object).ravel()))
        missing = sorted((lab for lab in counts if lab not in self.paths),
                         key=lambda lab: (-counts[lab], lab))
        if not missing:
            return
        shown = ", ".join(f"{lab!r} ({counts[lab]} cells)" for lab in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise HierarchyError(
            f"{len(missing)} label(s) of column {self.label_column!r} are not in the hierarchy: "
            f"{shown}{more}. Add them to the hierarchy file, or leave those cells out with "
            f"--exclude-labels {','.join(missing[:10])}.")

    def restrict(self, labels):
        """The hierarchy of only the leaf labels that occur in `labels` (order kept)."""
        present = set(_names(np.asarray(labels, dtype=object).ravel()))
        kept = {lab: path for lab, path in self.paths.items() if lab in present}
        if not kept:
            raise HierarchyError(
                f"none of the hierarchy's labels {list(self.paths)} occur in the data")
        return Hierarchy(self.label_column, self.levels, kept)

    def level_labels(self, labels):
        """Class names [n, L] of each cell at every level."""
        self.validate(labels)
        unique, inverse = np.unique(_names(np.asarray(labels, dtype=object).ravel()),
                                    return_inverse=True)
        table = np.array([self.paths[lab] for lab in unique], dtype=object).reshape(
            len(unique), self.n_levels)
        return table[inverse].astype(str)

    def level_codes(self, labels):
        """Class indices [n, L] of each cell at every level (index into classes(l))."""
        self.validate(labels)
        unique, inverse = np.unique(_names(np.asarray(labels, dtype=object).ravel()),
                                    return_inverse=True)
        table = np.array([[self._index[l][self.paths[lab][l]] for l in range(self.n_levels)]
                          for lab in unique], dtype=int).reshape(len(unique), self.n_levels)
        return table[inverse]

    # -- construction and serialisation --------------------------------------------------

    def to_dict(self):
        """JSON-able description; `labels` keeps the path order, which h5ad dicts lose."""
        return {"label_column": self.label_column,
                "levels": list(self.levels),
                "labels": list(self.paths),
                "paths": {lab: list(path) for lab, path in self.paths.items()}}

    @classmethod
    def from_dict(cls, d):
        for key in ("label_column", "levels", "paths"):
            if key not in d:
                raise HierarchyError(
                    f"hierarchy description lacks {key!r}; it needs keys "
                    f"'label_column', 'levels' and 'paths' (got {sorted(d)})")
        paths = dict(d["paths"])
        if "labels" in d:
            order = _names(d["labels"])
            if sorted(order) != sorted(str(k) for k in paths):
                raise HierarchyError("hierarchy 'labels' and the keys of 'paths' differ")
            paths = {lab: paths[lab] for lab in order}
        return cls(d["label_column"], _names(d["levels"]), paths)

    @classmethod
    def from_anndata(cls, adata):
        if "hierarchy" not in adata.uns:
            raise HierarchyError(
                "adata.uns has no 'hierarchy'. Pass a hierarchy file (e.g. "
                "--hierarchy data/pbmc_hierarchy.tsv), or store one with "
                "adata.uns['hierarchy'] = Hierarchy.from_file(path).to_dict()")
        return cls.from_dict(adata.uns["hierarchy"])

    @classmethod
    def from_obs(cls, obs, columns, label_column=None, partial=False, unlabelled_category=None):
        """Read paths from per-level obs columns; the leaf label column defaults to the last.

        partial: cells may lack labels (NaN, empty, or `unlabelled_category`) at some levels; the
        paths come from the fully labelled cells (`labels.label_codes` then reads the rest), and a
        class no cell is labelled below is its own leaf (`_coarse_only_paths`)."""
        columns = list(columns)
        label_column = columns[-1] if label_column is None else label_column
        missing = [c for c in dict.fromkeys(columns + [label_column]) if c not in obs.columns]
        if missing:
            raise HierarchyError(
                f"obs has no column(s) {missing}; available columns: {list(obs.columns)}")
        coarse_only = {}
        if partial and label_column == columns[-1]:
            coarse_only = _coarse_only_paths(obs, columns, unlabelled_category)
        table = obs[list(dict.fromkeys([label_column] + columns))]
        if partial:
            from .labels import missing_labels  # labels builds on this module
            missing = np.column_stack([missing_labels(table[c], unlabelled_category) for c in table.columns])
            table = table[~missing.any(axis=1)]
            if table.empty and not coarse_only:
                raise HierarchyError(f"no cell is labelled at every level {columns}; the hierarchy's paths come from "
                                     f"fully labelled cells: give a hierarchy file (--hierarchy) instead.")
        if table.isna().any().any():
            bad = [c for c in table.columns if table[c].isna().any()]
            counts = {c: int(table[c].isna().sum()) for c in bad}
            raise HierarchyError(f"obs columns {bad} have missing values ({counts} cells); fill them in, or drop "
                                 f"those cells (every cell needs a label at every level for now)")
        table = table.astype(str).drop_duplicates()
        paths = {}
        conflicts = {}
        for row in table.itertuples(index=False):
            rec = dict(zip(table.columns, row))
            label, path = rec[label_column], tuple(rec[c] for c in columns)
            if label in paths and paths[label] != path:
                conflicts.setdefault(label, [paths[label]]).append(path)
            paths.setdefault(label, path)
        if conflicts:
            shown = "; ".join(f"{lab!r}: {[list(p) for p in ps]}"
                              for lab, ps in list(conflicts.items())[:10])
            raise HierarchyError(
                f"{len(conflicts)} label(s) of {label_column!r} map to more than one path: {shown}")
        for label, path in coarse_only.items():
            if label in paths:
                raise HierarchyError(f"{label!r} names a leaf of path {list(paths[label])} and, at level "
                                     f"{columns[path.index(label)]!r}, a class no cell is labelled below; use "
                                     f"different names for the two.")
        return cls(label_column, columns, {**paths, **coarse_only})

    @classmethod
    def from_file(cls, path):
        """Read a .tsv (header: label column, then level names), .json or .yaml/.yml file."""
        path = Path(path)
        if path.is_dir():
            raise HierarchyError(f"{str(path)!r} is a folder; the hierarchy must be a .tsv, .json or .yaml file")
        if not path.is_file():
            raise HierarchyError(f"hierarchy file {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        if suffix in (".json", ".yaml", ".yml"):
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the text
            try:
                if suffix == ".json":
                    d = json.loads(text)
                else:
                    import yaml
                    d = yaml.safe_load(text)
            except Exception as err:  # json.JSONDecodeError or yaml.YAMLError
                raise HierarchyError(f"cannot parse {path}: {err}") from err
            if not isinstance(d, dict):
                raise HierarchyError(f"{path} must hold a mapping with 'label_column', "
                                     f"'levels' and 'paths'")
            try:
                return cls.from_dict(d)
            except HierarchyError as err:
                raise HierarchyError(f"{path}: {err}") from err
        return cls._from_tsv(path)

    @classmethod
    def _from_tsv(cls, path):
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [(i, row) for i, row in enumerate(csv.reader(handle, delimiter="\t"), 1)
                    if row and not row[0].startswith("#") and any(f.strip() for f in row)]
        if not rows:
            raise HierarchyError(f"hierarchy file {path} is empty")
        _, header = rows[0]
        header = [h.strip() for h in header]
        if len(header) < 2 or any(not h for h in header):
            raise HierarchyError(
                f"{path}: bad header {header}; it must be tab-separated: the label column name, "
                f"then one name per level (coarse to fine)")
        paths, first_line = {}, {}
        for line, row in rows[1:]:
            if len(row) != len(header):
                raise HierarchyError(
                    f"{path}, line {line}: {len(row)} tab-separated fields, expected "
                    f"{len(header)} ({', '.join(header)})")
            label = row[0].strip()
            if label in paths:
                raise HierarchyError(
                    f"{path}, line {line}: duplicate label {label!r} (first on line "
                    f"{first_line[label]})")
            paths[label] = tuple(f.strip() for f in row[1:])
            first_line[label] = line
        try:
            return cls(header[0], header[1:], paths)
        except HierarchyError as err:
            raise HierarchyError(f"{path}: {err}") from err

    # -- comparison ----------------------------------------------------------------------

    def __eq__(self, other):
        if not isinstance(other, Hierarchy):
            return NotImplemented
        return (self.label_column == other.label_column and self.levels == other.levels
                and list(self.paths.items()) == list(other.paths.items()))

    def __repr__(self):
        return (f"Hierarchy(label_column={self.label_column!r}, levels={self.levels}, "
                f"sizes={self.sizes}, n_labels={len(self.paths)})")
