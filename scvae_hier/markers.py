"""Marker genes: a user's knowledge of which genes mark a class of the hierarchy.

Without labels, TreeVAE's leaves are placed in the tree by the latent alone, and there the
annotated split can be a minor axis: on PBMC, naive CD4 and naive CD8 T cells lie closer than
CD4 and CD8 T cells, whose split is a few genes (CD8A, CD8B); and no label-free rule puts the
CD34+ leaf alone under Stem (analyses/tuning/tree/NOTES.md). A biologist knows those genes.
`--markers "CD8 T=CD8A,CD8B"` says so; the final refit then places the leaves so that a marked
class holds the leaves where its markers are highest (`tree.marker_violations`). With labels, the
same holds for the leaves the labels leave free (e.g. under a level-1 class when only level 1 is
labelled).

A marker set is given as "CLASS=GENE,GENE,...": CLASS a class name at any level of the
hierarchy (a name used at several levels, as PBMC's "B cell", means the coarsest: the same
leaves), genes by their names in the data. A cell's score for a set is the mean over its genes
of log(1 + 10^4 x_g / library size), scanpy's log-normalisation, on the model's genes (marker
genes are always kept among them, `data.prepare(keep_genes=)`).
"""
import numpy as np

SCALE = 1e4  # counts per cell after normalisation (scanpy's normalize_total target)


def parse(values) -> dict:
    """{class name: [gene names]} from "CLASS=GENE,GENE" strings (or such a dict, checked)."""
    if isinstance(values, dict):
        items = list(values.items())
    else:
        items = []
        for value in values:
            name, sep, genes = str(value).rpartition("=")
            if not sep or not name.strip():
                raise ValueError(f"--markers takes CLASS=GENE,GENE,... (e.g. 'CD8 T=CD8A,CD8B'); got {value!r}.")
            items.append((name, genes.split(",")))
    markers = {}
    for name, genes in items:
        genes = [genes] if isinstance(genes, str) else list(genes)
        genes = [str(g).strip() for g in genes if str(g).strip()]
        if not genes:
            raise ValueError(f"--markers: class {name!r} has no genes; give CLASS=GENE,GENE,...")
        if str(name).strip() in markers:
            raise ValueError(f"--markers names class {str(name).strip()!r} twice; give all its genes in one set.")
        markers[str(name).strip()] = genes
    return markers


def genes_of(markers) -> list:
    """Every marker gene once, in the order given."""
    return list(dict.fromkeys(g for genes in parse(markers).values() for g in genes))


def resolve(markers, hierarchy, genes) -> list:
    """[{"level", "class", "genes"}]: each set's class (level and class index in `hierarchy`) and
    its genes' columns in `genes` (the model's gene names). Unknown classes or genes are refused,
    naming them and what there is."""
    from .data import DataError   # here, not at the top: options.py reads `parse`, and --help loads no Keras
    position = {str(g): i for i, g in enumerate(genes)}
    classes = {}
    for level in range(hierarchy.n_levels):
        for k, name in enumerate(hierarchy.classes(level)):
            classes.setdefault(str(name), (level, k))
    resolved = []
    for name, names in parse(markers).items():
        if name not in classes:
            raise DataError(f"--markers names class {name!r}, which is not in the hierarchy; its classes are "
                            f"{sorted(classes)}.")
        missing = [g for g in names if g not in position]
        if missing:
            raise DataError(f"--markers: gene(s) {missing} of class {name!r} are not among the data's genes; check "
                            f"their names (adata.var_names).")
        level, k = classes[name]
        resolved.append({"level": level, "class": k, "genes": [position[g] for g in names]})
    return resolved


def scores(x, markers) -> np.ndarray:
    """[n, S] every cell's log-normalised mean expression of each marker set's genes, from counts
    x [n, G] (dense or sparse) and resolved `markers` (`resolve`)."""
    library = np.asarray(x.sum(axis=1), dtype="float64").reshape(-1, 1)
    out = np.zeros((x.shape[0], len(markers)))
    for s, marker in enumerate(markers):
        columns = x[:, marker["genes"]]
        columns = columns.toarray() if hasattr(columns, "toarray") else np.asarray(columns)
        out[:, s] = np.log1p(SCALE * columns / np.maximum(library, 1e-12)).mean(axis=1)
    return out
