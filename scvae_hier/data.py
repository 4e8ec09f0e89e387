"""Reading count matrices, checking they are raw counts, choosing genes, splitting, batching.

Everything here works on scipy CSR matrices of raw UMI counts (cells x genes) so that the
whole matrix is never densified; models see dense float32 minibatches only.
"""
from . import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import copy
import hashlib
from pathlib import Path

import anndata
import h5py
import keras
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

SUPPORTED_FORMATS = (".h5ad file, 10x matrix folder (matrix.mtx[.gz] with genes.tsv or "
                     "features.tsv[.gz] and barcodes.tsv[.gz]), 10x .h5 file, .loom file")
RAW_COUNTS_FIX = "pass raw UMI counts, e.g. --layer counts, not normalised/log data"


class DataError(ValueError):
    """Input data cannot be used as it is; the message says what is wrong and how to fix it."""


class SetupError(ValueError):
    """An AnnData was not set up for scvae-hier, or does not fit a trained model."""


class OutlierCountWarning(UserWarning):
    """Counts far outside their gene's range (reported; --outlier-counts clip clips them)."""


# -- reading -------------------------------------------------------------------------------

def _first_existing(folder, names):
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_10x_folder(folder):
    """10x Cell Ranger matrix folder, v2 (genes.tsv) or v3 (features.tsv.gz), gzipped or not.

    Read directly rather than with scanpy.read_10x_mtx, which accepts only the exact v2
    (plain) and v3 (gzipped) file sets.
    """
    matrix = _first_existing(folder, ["matrix.mtx.gz", "matrix.mtx"])
    features = _first_existing(folder, ["features.tsv.gz", "features.tsv",
                                        "genes.tsv.gz", "genes.tsv"])
    barcodes = _first_existing(folder, ["barcodes.tsv.gz", "barcodes.tsv"])
    if matrix is None or features is None or barcodes is None:
        present = sorted(p.name for p in folder.iterdir())
        raise DataError(
            f"{folder} is not a 10x matrix folder: it needs matrix.mtx[.gz], "
            f"features.tsv[.gz] or genes.tsv[.gz], and barcodes.tsv[.gz]; found {present}")
    X = sp.csr_matrix(scipy.io.mmread(matrix).T)  # 10x stores genes x cells
    genes = pd.read_csv(features, sep="\t", header=None, dtype=str)
    cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str)[0].to_numpy()
    if X.shape != (len(cells), len(genes)):
        raise DataError(f"{folder}: matrix is {X.shape[1]} x {X.shape[0]} (genes x cells) but "
                        f"there are {len(genes)} features and {len(cells)} barcodes")
    symbols = genes[1] if genes.shape[1] > 1 else genes[0]
    var = pd.DataFrame({"gene_ids": genes[0].to_numpy()},
                       index=anndata.utils.make_index_unique(pd.Index(symbols.to_numpy())))
    if genes.shape[1] > 2:  # v3: keep gene expression only, as Cell Ranger's gex matrix
        var["feature_types"] = genes[2].to_numpy()
        keep = (var["feature_types"] == "Gene Expression").to_numpy()
        X, var = X[:, keep], var[keep]
    return anndata.AnnData(X=X, obs=pd.DataFrame(index=cells), var=var)


def _read_loom(path):
    """Loom files store genes x cells; scVAE's 10x looms name cells CellID and genes Gene."""
    with h5py.File(path, "r") as f:
        col_attrs = set(f["col_attrs"]) if "col_attrs" in f else set()
        row_attrs = set(f["row_attrs"]) if "row_attrs" in f else set()
    return anndata.io.read_loom(
        path, sparse=True, X_name="", dtype="float32",
        obs_names="CellID" if "CellID" in col_attrs else "obs_names",
        var_names="Gene" if "Gene" in row_attrs else "var_names")


def read_counts(path, layer=None):
    """Read a count matrix into AnnData with CSR float32 X (counts from X or `layer`)."""
    adata = read_file(path)
    adata.X = file_counts(adata, layer, path)
    return adata


def read_file(path):
    """Any supported count file as AnnData, as stored (X untouched), with string, unique gene names."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{str(path)!r} does not exist; supported formats: {SUPPORTED_FORMATS}")
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            adata = _read_10x_folder(path)
        elif suffix == ".h5ad":
            adata = anndata.read_h5ad(path)
        elif suffix == ".loom":
            adata = _read_loom(path)
        elif suffix == ".h5":
            with h5py.File(path, "r") as f:
                if "obs" in f and "var" in f:
                    raise DataError(f"{str(path)!r} is an AnnData (.h5ad) file with an .h5 suffix (10x's format); "
                                    f"rename it to .h5ad")
            import scanpy as sc
            adata = sc.read_10x_h5(path)
        else:
            raise DataError(f"unknown format of {str(path)!r}; supported formats: "
                            f"{SUPPORTED_FORMATS}")
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read {str(path)!r} ({type(err).__name__}: {err}); supported "
                        f"formats: {SUPPORTED_FORMATS}") from err
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = adata.var_names.astype(str)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def file_counts(adata, layer, path):
    """The counts of `adata` (read from `path`): X, or its `layer`, as CSR float32; a missing layer
    is refused by name."""
    if layer is None:
        return sp.csr_matrix(adata.X, dtype=np.float32)
    if layer not in adata.layers:
        raise DataError(f"{str(path)!r} has no layer {layer!r}; available layers: "
                        f"{list(adata.layers)} (leave out --layer to use X)")
    return sp.csr_matrix(adata.layers[layer], dtype=np.float32)


# -- checking ------------------------------------------------------------------------------

def validate_counts(X, what="counts"):
    """Raise DataError unless X holds finite, non-negative integers (raw counts)."""
    values = X.data if sp.issparse(X) else np.asarray(X)
    checks = [(~np.isfinite(values), "NaN or infinite"), (values < 0, "negative")]
    if not np.issubdtype(values.dtype, np.integer):
        checks.append((np.isfinite(values) & (values != np.round(values)), "non-integer"))
    for bad, kind in checks:
        n_bad = int(np.count_nonzero(bad))
        if n_bad == 0:
            continue
        first = int(np.flatnonzero(bad.ravel())[0])
        if sp.issparse(X):
            coo = X.tocoo()  # same entry order as .data for CSR/CSC/COO
            row, col = int(coo.row[first]), int(coo.col[first])
        else:
            row, col = (int(i) for i in np.unravel_index(first, values.shape)) \
                if values.ndim == 2 else (first, 0)
        raise DataError(
            f"{what} contain {n_bad} {kind} value(s), e.g. row {row}, column {col}: "
            f"{values.ravel()[first]!r}; {RAW_COUNTS_FIX}")


# -- preprocessing -------------------------------------------------------------------------

MIN_CELLS_GENE_SELECTION = 20  # seurat_v3's loess fit of variance on mean needs a spread of cells


def _highly_variable(X, n_genes):
    """Indices (in original order) of the n_genes seurat_v3 highly variable genes."""
    import scanpy as sc
    if X.shape[0] < MIN_CELLS_GENE_SELECTION:
        raise DataError(f"Choosing {n_genes} highly variable genes (seurat_v3) needs at least "
                        f"{MIN_CELLS_GENE_SELECTION} cells; there are {X.shape[0]}. Keep all genes with --n-genes 0 "
                        f"(n_genes=0), or use more cells.")
    tmp = anndata.AnnData(X=X.copy())
    tmp.var_names = [str(i) for i in range(X.shape[1])]
    try:
        sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=n_genes)
    except Exception as error:  # the loess fit fails on degenerate data with LAPACK/ValueErrors
        raise DataError(f"seurat_v3 gene selection failed on these {X.shape[0]} cells ({type(error).__name__}: "
                        f"{error}); keep all genes with --n-genes 0, or use more cells.") from None
    return np.flatnonzero(tmp.var["highly_variable"].to_numpy())


def label_values(obs, column):
    """A label column as strings, with missing labels (NaN, None) as "nan", the name
    --exclude-labels takes to drop those cells."""
    values = obs[column]
    return values.astype(object).where(values.notna(), "nan").astype(str).to_numpy()


def find_outliers(X, factor=20.0, floor=1000.0):
    """Entries far above their gene's typical range: above max(floor, factor x the gene's 99th
    percentile over cells). A UMI count of 10^6 in one gene of one cell is a data error, and one
    such entry dominates the training ELBO. (The 99th, not a higher percentile, so that on a few
    hundred cells the outlier itself is not the reference.) Returns (rows, columns, values,
    thresholds per gene)."""
    X = sp.csr_matrix(X)
    n_cells = X.shape[0]
    csc = X.tocsc()
    reference = np.zeros(X.shape[1])
    rank = int(np.ceil(0.99 * n_cells))  # 1-based rank of the 99th percentile among all cells
    for g in range(X.shape[1]):
        column = np.sort(csc.data[csc.indptr[g]:csc.indptr[g + 1]])
        above_zeros = rank - (n_cells - column.size)  # zeros fill the lowest ranks
        if above_zeros > 0:
            reference[g] = column[above_zeros - 1]
    threshold = np.maximum(floor, factor * reference)
    coo = X.tocoo()
    bad = coo.data > threshold[coo.col]
    return coo.row[bad], coo.col[bad], coo.data[bad], threshold


def _check_unique(names, what, fix):
    names = pd.Index(names)
    if not names.is_unique:
        repeated = names[names.duplicated()].unique()
        raise DataError(f"{len(repeated)} {what} names occur more than once (e.g. {list(repeated[:3])}), so results "
                        f"cannot be matched to them; {fix}.")


def _with_kept_genes(selected, keep_genes, var_names):
    """The selected gene columns plus those of `keep_genes` (e.g. marker genes), in the data's order;
    a kept gene the data lacks is refused by name."""
    if not len(keep_genes):
        return selected
    position = {str(g): i for i, g in enumerate(var_names)}
    missing = [str(g) for g in keep_genes if str(g) not in position]
    if missing:
        raise DataError(f"gene(s) {missing} (marker genes, --markers) are not in the data; check their names "
                        f"against adata.var_names.")
    return np.union1d(selected, [position[str(g)] for g in keep_genes]).astype(int)


def cells_kept(obs, label_column, exclude_labels, exclude_cells=None) -> np.ndarray:
    """Indices of the cells left when the labels `exclude_labels` of obs[label_column] are left
    out (all cells without any), refusing a missing column, an absent label or no cell left.
    exclude_cells: [n] bool, cells left out with them (labelled only above excluded leaves)."""
    cells = np.arange(len(obs))
    if label_column is not None and label_column not in obs:
        raise DataError(f"obs has no label column {label_column!r}; available obs columns: {list(obs.columns)}")
    if exclude_labels:
        if label_column is None:
            raise DataError("exclude_labels needs a label column (--label-column)")
        labels = label_values(obs, label_column)
        absent = [lab for lab in exclude_labels if lab not in set(labels)]
        if absent:
            raise DataError(f"excluded label(s) {absent} do not occur in obs[{label_column!r}]; its labels "
                            f"are {sorted(set(labels))}")
        left_out = np.isin(labels, exclude_labels)
        if exclude_cells is not None:
            left_out |= np.asarray(exclude_cells, bool)
        cells = np.flatnonzero(~left_out)
        if len(cells) == 0:
            raise DataError(f"excluding {exclude_labels} leaves no cells")
    return cells


def gene_positions(var_names, genes, var=None) -> np.ndarray:
    """Column of each of `genes` (a trained model's, in its order) in `var_names`, refusing the
    data when any is missing, with their names, and, when a column of `var` (the data's gene
    table) holds the genes instead (symbols there, Ensembl IDs as names), that column."""
    genes = [str(g) for g in genes]
    position = {g: i for i, g in enumerate(var_names)}
    missing = [g for g in genes if g not in position]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        hint = ""
        for column in ([] if var is None else var.columns):
            found = len(set(genes) & set(var[column].astype(str)))
            if found > len(genes) - len(missing):
                hint = (f". var[{column!r}] holds {found} of them: use it as the gene names "
                        f"(adata.var_names = adata.var[{column!r}].astype(str); adata.var_names_make_unique())")
                break
        if not hint:
            hint = (". To read the data anyway with those genes as zero counts (not expressed), pad it: "
                    "scvae_hier.prepare_query_anndata(adata, model), or `scvae-hier annotate --missing-genes zeros`")
        raise DataError(f"{len(missing)} of the {len(genes)} required genes are missing from the data: {shown}{hint}")
    return np.array([position[g] for g in genes], dtype=int)


def prepare(adata, n_genes=500, genes=None, label_column=None, exclude_labels=(),
            drop_empty_cells=False, outlier_counts="keep", keep_genes=(), exclude_cells=None):
    """Checked raw counts of the chosen cells and genes, ready for training or evaluation.

    outlier_counts: entries far above their gene's range (see `find_outliers`) are always
    reported with an OutlierCountWarning; "clip" also clips them to that range.
    keep_genes: gene names kept besides the highly variable ones (marker genes)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(f"the count matrix is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    _check_unique(adata.obs_names, "cell", "make them unique first (adata.obs_names_make_unique())")
    _check_unique(adata.var_names, "gene", "make them unique first (adata.var_names_make_unique())")
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    validate_counts(X)
    exclude_labels = [str(lab) for lab in exclude_labels]
    record = {"n_cells_input": int(adata.n_obs), "n_genes_input": int(adata.n_vars)}

    cells = cells_kept(adata.obs, label_column, exclude_labels, exclude_cells)
    if exclude_labels:
        X = X[cells]
    record.update(label_column=label_column or "", excluded_labels=",".join(exclude_labels),
                  n_cells_excluded=int(adata.n_obs - len(cells)))

    if genes is not None:
        selected = gene_positions(adata.var_names, genes, adata.var)
        record.update(gene_selection="given", n_genes_all_zero_dropped=0)
    else:
        nonzero = np.flatnonzero(X.getnnz(axis=0) > 0)
        if len(nonzero) == 0:
            raise DataError("every gene has zero counts in the selected cells")
        record["n_genes_all_zero_dropped"] = int(adata.n_vars - len(nonzero))
        if n_genes and n_genes < len(nonzero):
            selected = nonzero[_highly_variable(X[:, nonzero], int(n_genes))]
            record["gene_selection"] = "seurat_v3"
        else:
            selected = nonzero
            record["gene_selection"] = "all"
        selected = _with_kept_genes(selected, keep_genes, adata.var_names)
    record["n_genes_requested"] = int(n_genes or 0)
    X = X[:, selected]

    empty = np.asarray(X.sum(axis=1)).ravel() == 0
    n_empty = int(empty.sum())
    if n_empty and not drop_empty_cells:
        raise DataError(
            f"{n_empty} of {X.shape[0]} cells have zero counts over the {X.shape[1]} selected "
            f"genes; drop them with --drop-empty-cells (drop_empty_cells=True), or select "
            f"more genes (--n-genes)")
    if n_empty:
        if n_empty == X.shape[0]:
            raise DataError(f"all {n_empty} cells have zero counts over the selected genes")
        cells, X = cells[~empty], X[~empty]
    record.update(n_cells_empty_dropped=n_empty, n_cells=int(X.shape[0]),
                  n_genes=int(X.shape[1]))
    X = _handle_outliers(X, adata.var_names[selected], outlier_counts, record)

    obs = adata.obs.iloc[cells].copy()
    for column in obs.columns:
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            obs[column] = obs[column].cat.remove_unused_categories()
    out = anndata.AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=obs,
                          var=adata.var.iloc[selected].copy(), uns=copy.deepcopy(dict(adata.uns)))
    out.uns["preprocessing"] = record
    return out


def _handle_outliers(X, genes, outlier_counts, record):
    """Report (and with "clip", clip) outlier entries; the record keeps what was found."""
    rows, columns, values, threshold = find_outliers(X)
    if report_outliers(rows, columns, values, genes, outlier_counts, record):
        X = X.tocsr(copy=True)
        X[rows, columns] = threshold[columns]
    return X


def report_outliers(rows, columns, values, genes, outlier_counts, record) -> bool:
    """Warn about outlier entries (found by `find_outliers`) and record them; True when they are to
    be clipped (shared by the in-memory and the out-of-core path)."""
    import warnings

    record["n_outlier_counts"] = int(len(values))
    if not len(values):
        return False
    worst = np.argsort(-values)[:5]
    named = sorted(set(genes[columns].tolist()))
    message = (f"{len(values)} count(s) lie far above their gene's range (more than 20x its 99th percentile "
               f"over cells, and over 1000), in {len(named)} gene(s): {', '.join(named[:10])}"
               f"{' ...' if len(named) > 10 else ''}; largest: "
               + ", ".join(f"{values[i]:g} ({genes[columns[i]]}, cell {rows[i]})" for i in worst) + ". ")
    if outlier_counts == "clip":
        record["outlier_counts"] = "clipped"
        warnings.warn(message + "They were clipped to that range (--outlier-counts clip).", OutlierCountWarning,
                      stacklevel=4)
        return True
    record["outlier_counts"] = "kept"
    warnings.warn(message + "They are kept; they can dominate the training objective: check the data, or "
                  "clip them with --outlier-counts clip (outlier_counts='clip').", OutlierCountWarning,
                  stacklevel=4)
    return False


# -- splits and bookkeeping ----------------------------------------------------------------

def split_cells(n_cells, fractions=(0.8, 0.1, 0.1), seed=0):
    """Seeded random 'train'/'validation'/'test' assignment of n_cells cells.

    A set with a positive fraction gets at least one cell when n_cells >= 3.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1):
        raise DataError(f"split fractions must be three non-negative numbers (train, "
                        f"validation, test) that sum to 1; got {list(fractions)}")
    sizes = np.floor(fractions * n_cells).astype(int)
    remainder = fractions * n_cells - sizes
    for i in np.argsort(-remainder, kind="stable")[: n_cells - sizes.sum()]:
        sizes[i] += 1
    if n_cells >= 3:
        for i in np.flatnonzero((fractions > 0) & (sizes == 0)):
            sizes[np.argmax(sizes)] -= 1
            sizes[i] += 1
    names = np.repeat(np.array(["train", "validation", "test"]), sizes)
    out = np.empty(n_cells, dtype=names.dtype)
    out[np.random.default_rng(seed).permutation(n_cells)] = names
    return out


def fold_cells(n_cells, n_folds, fold, validation_fraction=0.1, seed=0, labels=None):
    """'train'/'validation'/'test' for fold `fold` of a seeded `n_folds`-fold cross-validation.

    The seed fixes one partition of the cells into folds (scikit-learn's StratifiedKFold on
    `labels` when given, so a rare class such as Stem, 9% of the cells, is in every fold in
    proportion; KFold otherwise), so folds 0..K-1 of the same seed test every cell exactly once;
    the validation cells (validation_fraction of all cells) are drawn from the other folds,
    stratified too when every class there has at least two cells."""
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    if n_folds < 2 or not 0 <= fold < n_folds:
        raise DataError(f"--fold must be in 0..{n_folds - 1} and --folds at least 2; got fold {fold} of {n_folds}")
    if n_cells < n_folds:
        raise DataError(f"{n_cells} cells cannot be split into {n_folds} folds")
    if not 0 <= validation_fraction < 1 - 1 / n_folds:
        raise DataError(f"the validation fraction {validation_fraction} leaves no training cells with {n_folds} folds")
    cells = np.arange(n_cells)
    if labels is not None:
        labels = np.asarray(labels).astype(str)
        if len(labels) != n_cells:
            raise DataError(f"{len(labels)} labels for {n_cells} cells")
        if np.unique(labels, return_counts=True)[1].min() < n_folds:
            labels = None  # a class with fewer cells than folds cannot be in every fold
    splitter = (StratifiedKFold(n_folds, shuffle=True, random_state=seed) if labels is not None
                else KFold(n_folds, shuffle=True, random_state=seed))
    _, test = list(splitter.split(cells, labels))[fold]
    out = np.full(n_cells, "train", dtype="<U10")
    out[test] = "test"
    rest = np.flatnonzero(out == "train")
    n_validation = int(round(validation_fraction * n_cells))
    if n_validation:
        strata = labels[rest] if labels is not None else None
        if strata is not None and np.unique(strata, return_counts=True)[1].min() < 2:
            strata = None
        _, validation = train_test_split(rest, test_size=n_validation, random_state=seed + fold, stratify=strata)
        out[validation] = "validation"
    return out


def batch_covariates(obs, batch_key, categories=None):
    """One-hot [cells, categories] float32 of obs[batch_key] and the category names, or (None, [])
    without a key. Training takes the sorted categories it finds; evaluation passes the model's
    own `categories`, and a cell of a category the model never saw is refused."""
    if not batch_key:
        return None, []
    if batch_key not in obs:
        fix = "" if categories is None else (
            f" The model was trained with batches {[str(c) for c in categories]}: add the column, or read every cell "
            f"as one of them (`scvae-hier annotate --batch NAME`, `batch=NAME` in the API).")
        raise DataError(f"The batch covariate {batch_key!r} is not an obs column; obs has {sorted(obs.columns)}.{fix}")
    values = obs[batch_key]
    if categories is None and pd.api.types.is_float_dtype(values):
        raise DataError(f"obs[{batch_key!r}] holds real numbers ({values.nunique()} distinct values), not batch "
                        f"categories; pass a column of batch names (convert it with .astype(str) if its numbers "
                        f"are batch labels).")
    if values.isna().any():
        raise DataError(f"obs[{batch_key!r}] is missing for {int(values.isna().sum())} cells; fill it in or "
                        f"drop those cells.")
    values = values.astype(str).to_numpy()
    categories = sorted(set(values)) if categories is None else [str(c) for c in categories]
    unknown = sorted(set(values) - set(categories))
    if unknown:
        raise DataError(f"obs[{batch_key!r}] has categories {unknown} that the model was not trained with "
                        f"({categories}); a batch covariate only corrects batches it has seen. To name such cells with "
                        f"a trained model, read them as a trained batch (`scvae-hier annotate --batch NAME`) or fit "
                        f"their batches with the rest of the model frozen (`--fit-new-batches`, "
                        f"`model.fit_new_batches(query)`).")
    codes = pd.Index(categories).get_indexer(values)
    return np.eye(len(categories), dtype=np.float32)[codes], categories


def file_checksum(path):
    """sha256 of a file, or of every file in a folder (relative names and contents, sorted)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"cannot checksum {str(path)!r}: it does not exist")
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# -- batching ------------------------------------------------------------------------------

class CountBatches(keras.utils.PyDataset):
    """Dense float32 minibatches sliced from a CSR count matrix (never densifies the whole matrix).

    With shuffle=True, the order of epoch e is a permutation from default_rng([seed, e]), where
    `epoch` counts on_epoch_end calls; a resumed run sets `batches.epoch` to get the same order.
    """

    def __init__(self, X, batch_size=128, shuffle=False, seed=0, covariates=None, labels=None, **kwargs):
        super().__init__(**kwargs)
        if getattr(X, "on_disk", False):  # rows read from disk per batch
            self.X = X
        else:
            self.X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
        self.n = self.X.shape[0]
        if covariates is not None:
            covariates = np.asarray(covariates)
            if len(covariates) != self.n:
                raise DataError(f"{len(covariates)} covariate rows for {self.n} cells")
        self.covariates = covariates
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int32)
            if len(labels) != self.n:
                raise DataError(f"{len(labels)} label rows for {self.n} cells")
        self.labels = labels  # [n, L] class codes per level, -1 unlabelled (semi-supervised training)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._order = (None, None)  # (epoch, permutation) cache

    def __len__(self):
        return -(-self.n // self.batch_size)

    def order(self):
        """Row order of the current epoch."""
        if not self.shuffle:
            return np.arange(self.n)
        if self._order[0] != self.epoch:
            self._order = (self.epoch, self.shuffled_order(self.epoch))
        return self._order[1]

    def shuffled_order(self, epoch):
        """The seeded row permutation of epoch counter `epoch` (order() and as_dataset() both use it)."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        rows = self.order()[index * self.batch_size:(index + 1) * self.batch_size]
        x = self.X[rows]  # a CSR, dense or on-disk (scvae_hier.ondisk) matrix
        batch = {"counts": x.toarray() if hasattr(x, "toarray") else x}
        if self.covariates is not None:
            batch["covariates"] = self.covariates[rows]
        if self.labels is not None:
            batch["labels"] = self.labels[rows]
        return batch

    def on_epoch_end(self):
        self.epoch += 1

    @property
    def in_memory(self) -> bool:
        return not getattr(self.X, "on_disk", False)

    def as_dataset(self, first_epoch=0):
        """The same batches as a native tf.data pipeline, for a matrix held in memory.

        Why: Keras reads a PyDataset through a Python generator, one call per batch, and on two
        cores that measured as much time again as the training step itself (benchmarks/feed_speed.py).
        Here Python only draws each epoch's permutation (`shuffled_order`, as `order()` does);
        TensorFlow gathers the rows. Shuffled: one epoch after another without end, the first with epoch counter
        `first_epoch`, for fit(..., steps_per_epoch=len(self)). Unshuffled: one pass in order."""
        import tensorflow as tf

        if not self.in_memory:
            raise ValueError("as_dataset needs the counts in memory; an on-disk matrix is read batch by batch by "
                             "iterating the CountBatches itself.")
        gather = self._row_gather()
        if self.shuffle:
            def permutation(epoch):
                return self.shuffled_order(epoch).astype(np.int64)

            orders = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).map(
                lambda epoch: tf.ensure_shape(tf.numpy_function(permutation, [epoch], tf.int64), [self.n]))
            rows = orders.flat_map(lambda order: tf.data.Dataset.from_tensor_slices(order).batch(self.batch_size))
        else:
            rows = tf.data.Dataset.range(self.n).batch(self.batch_size)
        return rows.map(gather).prefetch(2)

    def _row_gather(self):
        """A TensorFlow function from row indices to the batch dict of __getitem__ (CSR rows
        scattered into a dense block, as toarray() does, duplicates summed)."""
        import tensorflow as tf

        n_genes = self.X.shape[1]
        if sp.issparse(self.X):
            splits = tf.constant(self.X.indptr.astype(np.int64))
            genes = tf.RaggedTensor.from_row_splits(tf.constant(self.X.indices.astype(np.int32)), splits)
            values = tf.RaggedTensor.from_row_splits(tf.constant(self.X.data), splits)

            def counts(rows):
                row_genes, row_values = tf.gather(genes, rows), tf.gather(values, rows)
                at = tf.stack([row_genes.value_rowids(), tf.cast(row_genes.flat_values, tf.int64)], axis=1)
                return tf.scatter_nd(at, row_values.flat_values, tf.stack([tf.size(rows, out_type=tf.int64), n_genes]))
        else:
            dense = tf.constant(self.X)
            counts = lambda rows: tf.gather(dense, rows)  # noqa: E731
        covariates = None if self.covariates is None else tf.constant(self.covariates)
        labels = None if self.labels is None else tf.constant(self.labels)

        def batch(rows):
            result = {"counts": counts(rows)}
            if covariates is not None:
                result["covariates"] = tf.gather(covariates, rows)
            if labels is not None:
                result["labels"] = tf.gather(labels, rows)
            return result

        return batch

    def release(self):
        """Drop the references to the cells' data. Keras keeps every PyDataset that `predict` or
        `fit` has iterated alive for the rest of the process (tf.data's generator registry;
        keras-team/keras#13118), so without this a loop of predictions over chunks of a large
        file keeps every chunk in memory (2.4 GB more at 1M cells)."""
        self.X = self.covariates = self.labels = None
