"""Out-of-core counts, for an .h5ad file larger than memory.

The file's count matrix is read in row chunks and never held whole: one pass counts each gene's
sum, sum of squares and non-zeros, a second pass gives seurat_v3 its clipped sums (the same
statistics scanpy computes in memory, so the same genes are chosen), and a third writes the
chosen genes once as CSR arrays (`data.npy`, `indices.npy`, `indptr.npy`) into a store folder.
Minibatches then read their rows from the memory-mapped store, and outputs are predicted and
written to outputs.h5ad a chunk of cells at a time. What stays in memory grows with the number
of cells only through per-cell vectors (obs, row offsets, split, clusters), not with the counts.

`prepare` here and `data.prepare` give the same cells, genes and counts on data that fits in
memory (tests/test_ondisk.py), so batches, training and outputs are the same too.
"""
import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem

from .data import (MIN_CELLS_GENE_SELECTION, DataError, _check_unique, _with_kept_genes, cells_kept, gene_positions,
                   report_outliers, validate_counts)

CHUNK_CELLS = 8192        # rows read at a time: bounds memory at (chunk x genes of the file) non-zeros
AUTO_NONZEROS = 250_000_000  # "auto" goes out of core above this many stored counts (about 2 GB in CSR)
HISTOGRAM_CAP = 1024      # per-gene count histogram width for the outlier percentile (exact below it)


# -- the on-disk count matrix --------------------------------------------------------------

class DiskCounts:
    """Rows of a CSR store folder (all of them, or a subset in a given order). Indexing with a
    mask or row numbers gives another view; `toarray`/`tocsr` read only the view's rows. Quacks
    enough like a scipy matrix for `data.CountBatches`, initialisation and metadata.

    Rows are read with positioned reads (one per run of consecutive rows), not through a memory
    map: pages of a map that an epoch touches count as the process's resident memory, so a
    mapped store would look like (and, for the kernel, be) memory the size of the store."""
    on_disk = True
    dtype = np.float32

    def __init__(self, folder, rows=None):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "store.json").read_text())
        self.n_genes = int(meta["n_genes"])
        self.indptr = np.load(self.folder / "indptr.npy")
        self.rows = np.arange(len(self.indptr) - 1) if rows is None else np.asarray(rows, dtype=np.int64)
        self.files = {name: _NpyFile(self.folder / f"{name}.npy") for name in ("data", "indices")}

    def _view(self, rows):
        view = object.__new__(DiskCounts)
        view.__dict__.update(self.__dict__, rows=rows)
        return view

    @property
    def shape(self):
        return (len(self.rows), self.n_genes)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            raise TypeError("on-disk counts are indexed by rows only (a mask, row numbers or a slice)")
        return self._view(self.rows[key])

    def tocsr(self) -> sp.csr_matrix:
        rows = self.rows
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
        spans = [(self.indptr[run[0]], self.indptr[run[-1] + 1]) for run in runs]
        data = [self.files["data"].read(a, b) for a, b in spans] or [np.zeros(0, np.float32)]
        indices = [self.files["indices"].read(a, b) for a, b in spans] or [np.zeros(0, np.int32)]
        indptr = np.concatenate([[0], np.cumsum(self.indptr[rows + 1] - self.indptr[rows])])
        return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=self.shape)

    def toarray(self) -> np.ndarray:
        return self.tocsr().toarray()

    def chunks(self, size=None):
        """(start, CSR of rows start..start+size) over the view (size: CHUNK_CELLS)."""
        size = size or CHUNK_CELLS
        for start in range(0, len(self.rows), size):
            yield start, self[start:start + size].tocsr()

    def sum(self, axis=None):
        """Row totals as an [n, 1] array (axis=1, what the callers ask for)."""
        if axis != 1:
            raise ValueError("on-disk counts sum over genes only (axis=1)")
        totals = np.load(self.folder / "row_sums.npy")
        return totals[self.rows][:, None]


class _NpyFile:
    """Positioned reads of a 1-D .npy file's items [start, stop)."""

    def __init__(self, path):
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(handle) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(handle))
            self.offset = handle.tell()
        self.dtype, self.path = np.dtype(dtype), path
        self.handle = open(path, "rb")

    def read(self, start, stop) -> np.ndarray:
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self.handle.fileno(), int(stop - start) * size,
                                      self.offset + int(start) * size), dtype=self.dtype)


def write_store(folder, chunks, n_rows, n_genes, nnz):
    """Write CSR chunks (in row order, `nnz` entries in all) as a store folder; returns the row
    totals. Each array is an .npy header for its known length followed by the chunks' bytes,
    appended (a writable memory map would keep every written page in the process's memory)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    totals = np.zeros(n_rows, dtype=np.float64)
    row = 0
    with open(folder / "data.npy", "wb") as data, open(folder / "indices.npy", "wb") as indices:
        for handle, dtype in ((data, np.float32), (indices, np.int32)):
            np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False, "shape": (nnz,)})
        for chunk in chunks:
            chunk = sp.csr_matrix(chunk)
            start = indptr[row]
            data.write(chunk.data.astype(np.float32).tobytes())
            indices.write(chunk.indices.astype(np.int32).tobytes())
            indptr[row + 1:row + 1 + chunk.shape[0]] = start + chunk.indptr[1:]
            totals[row:row + chunk.shape[0]] = np.asarray(chunk.sum(axis=1)).ravel()
            row += chunk.shape[0]
    if row != n_rows or indptr[-1] != nnz:
        raise RuntimeError(f"store {folder}: wrote {row} rows and {indptr[-1]} counts, expected {n_rows} and {nnz}")
    np.save(folder / "indptr.npy", indptr)
    np.save(folder / "row_sums.npy", totals)
    (folder / "store.json").write_text(json.dumps({"n_rows": int(n_rows), "n_genes": int(n_genes), "nnz": int(nnz)}))
    return totals


# -- the file ------------------------------------------------------------------------------

@dataclass
class DiskData:
    """An .h5ad file opened for chunked reading: obs, var and uns in memory, counts on disk. After
    `prepare`, X is the store of the chosen cells and genes (a `DiskCounts`). Has the attributes of
    AnnData that the training pipeline reads."""
    path: Path
    layer: str
    obs: pd.DataFrame
    var: pd.DataFrame
    uns: dict
    X: object = None
    seconds: dict = field(default_factory=dict)
    on_disk = True

    @property
    def n_obs(self):
        return len(self.obs)

    @property
    def n_vars(self):
        return len(self.var)

    @property
    def obs_names(self):
        return self.obs.index

    @property
    def var_names(self):
        return self.var.index

    def to_anndata(self, keep) -> anndata.AnnData:
        """The prepared cells selected by the mask `keep`, counts in memory (CSR)."""
        return anndata.AnnData(X=self.X[keep].tocsr(), obs=self.obs[keep].copy(), var=self.var.copy(),
                               uns=copy.deepcopy(self.uns))

    def _element(self, handle):
        return handle["X"] if self.layer is None else handle["layers"][self.layer]

    def row_chunks(self, rows, size=None):
        """CSR float32 chunks of the given (sorted) rows of the file, read a block of rows at a time
        (size: CHUNK_CELLS)."""
        size = size or CHUNK_CELLS
        with h5py.File(self.path, "r") as handle:
            element = self._element(handle)
            if isinstance(element, h5py.Group):
                kind = element.attrs.get("encoding-type")
                if kind != "csr_matrix":
                    raise DataError(f"{self.path}: the counts are stored as {kind}, which cannot be read a block of "
                                    f"cells at a time; rewrite the file with CSR counts (adata.X = "
                                    f"scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(...)) or use --out-of-core off.")
                matrix = sparse_dataset(element)
            else:
                matrix = element
            n_rows = matrix.shape[0]
            for start in range(0, n_rows, size):
                stop = min(start + size, n_rows)
                block = rows[np.searchsorted(rows, start):np.searchsorted(rows, stop)]
                if len(block) == 0:
                    continue
                chunk = sp.csr_matrix(matrix[start:stop], dtype=np.float32)
                if len(block) < stop - start:
                    chunk = chunk[block - start]
                validate_counts(chunk, what=f"counts of cells {start}-{stop - 1}")
                yield chunk


def read(path, layer=None) -> DiskData:
    """Open an .h5ad file for out-of-core use, reading everything but its counts."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".h5ad":
        raise DataError(f"out-of-core reading needs an .h5ad file; {str(path)!r} is not one. Convert it "
                        f"(adata.write_h5ad) or use --out-of-core off.")
    try:
        with h5py.File(path, "r") as handle:
            if layer is not None and layer not in handle.get("layers", {}):
                raise DataError(f"{str(path)!r} has no layer {layer!r}; available layers: "
                                f"{list(handle.get('layers', {}))} (leave out --layer to use X)")
            obs, var = read_elem(handle["obs"]), read_elem(handle["var"])
            uns = read_elem(handle["uns"]) if "uns" in handle else {}
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read {str(path)!r} ({type(err).__name__}: {err})") from err
    obs.index = obs.index.astype(str)
    var.index = var.index.astype(str)
    if not var.index.is_unique:
        var.index = anndata.utils.make_index_unique(var.index)
    return DiskData(path, layer, obs, var, uns)


def use_out_of_core(path, setting: str, layer=None) -> bool:
    """Whether to train out of core: "on", "off", or "auto" (an .h5ad with more than
    AUTO_NONZEROS stored counts)."""
    if setting in ("on", "off"):
        return setting == "on"
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".h5ad"):
        return False
    try:
        with h5py.File(path, "r") as handle:
            element = handle["X"] if layer is None else handle["layers"][layer]
            stored = element["data"].shape[0] if isinstance(element, h5py.Group) else np.prod(element.shape)
    except Exception:
        return False  # the in-memory reader reports the problem
    return int(stored) > AUTO_NONZEROS


# -- preparation ---------------------------------------------------------------------------

def gene_statistics(chunks, n_genes):
    """Per-gene sum, sum of squares and non-zero count (float64) over CSR chunks, and the cells seen."""
    total, squares, nonzeros, n_cells = np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes), 0
    for chunk in chunks:
        values = chunk.data.astype(np.float64)
        total += np.bincount(chunk.indices, values, n_genes)
        squares += np.bincount(chunk.indices, values ** 2, n_genes)
        nonzeros += np.bincount(chunk.indices, minlength=n_genes)
        n_cells += chunk.shape[0]
    return total, squares, nonzeros, n_cells


def seurat_v3(chunks_again, total, squares, n_cells, n_top, span=0.3):
    """Indices of the n_top seurat_v3 genes (scanpy's flavor, one batch) from first-pass sums and
    a second pass (`chunks_again()`, CSR chunks of the same genes) for the clipped sums."""
    from skmisc.loess import loess

    mean = total / n_cells
    variance = (squares - n_cells * mean ** 2) / (n_cells - 1)
    varying = variance > 0
    fitted = np.zeros(len(mean))
    try:
        model = loess(np.log10(mean[varying]), np.log10(variance[varying]), span=span, degree=2)
        model.fit()
    except Exception as error:  # the loess fit fails on degenerate data with LAPACK/ValueErrors
        raise DataError(f"seurat_v3 gene selection failed on these {n_cells} cells ({type(error).__name__}: "
                        f"{error}); keep all genes with --n-genes 0, or use more cells.") from None
    fitted[varying] = model.outputs.fitted_values
    regularised_std = np.sqrt(10 ** fitted)
    clip = regularised_std * np.sqrt(n_cells) + mean
    clipped, clipped_squares = np.zeros(len(mean)), np.zeros(len(mean))
    for chunk in chunks_again():
        values = np.minimum(chunk.data.astype(np.float64), clip[chunk.indices])
        clipped += np.bincount(chunk.indices, values, len(mean))
        clipped_squares += np.bincount(chunk.indices, values ** 2, len(mean))
    normalised = (n_cells * mean ** 2 + clipped_squares - 2 * clipped * mean) / ((n_cells - 1) * regularised_std ** 2)
    return np.sort(np.argsort(-normalised)[:n_top])


def outlier_entries(counts: DiskCounts, factor=20.0, floor=1000.0):
    """`data.find_outliers` on a store, from per-gene histograms of the (integer) counts: exact,
    with the rare gene whose 99th percentile lies above HISTOGRAM_CAP read as a whole column."""
    n_cells, n_genes = counts.shape
    histogram = np.zeros((n_genes, HISTOGRAM_CAP + 1), dtype=np.int64)
    for _, chunk in counts.chunks():
        capped = np.minimum(chunk.data, HISTOGRAM_CAP).astype(np.int64)
        histogram += np.bincount(chunk.indices * (HISTOGRAM_CAP + 1) + capped,
                                 minlength=n_genes * (HISTOGRAM_CAP + 1)).reshape(n_genes, -1)
    rank = int(np.ceil(0.99 * n_cells))
    reference = np.zeros(n_genes)
    above_zeros = rank - (n_cells - histogram.sum(axis=1))  # unstored zeros fill the lowest ranks
    wide = []
    for g in np.flatnonzero(above_zeros > 0):
        value = int(np.searchsorted(np.cumsum(histogram[g]), above_zeros[g]))  # the bin is the value
        if value >= HISTOGRAM_CAP:
            wide.append(g)
        else:
            reference[g] = value
    if wide:
        columns = {g: [] for g in wide}
        for _, chunk in counts.chunks():
            for g in wide:
                columns[g].append(chunk.data[chunk.indices == g])
        for g in wide:
            reference[g] = np.sort(np.concatenate(columns[g]))[above_zeros[g] - 1]
    threshold = np.maximum(floor, factor * reference)
    rows, cols, values = [], [], []
    for start, chunk in counts.chunks():
        coo = chunk.tocoo()
        bad = coo.data > threshold[coo.col]
        rows.append(coo.row[bad] + start)
        cols.append(coo.col[bad])
        values.append(coo.data[bad])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(values), threshold


def _clip_in_store(counts: DiskCounts, rows, columns, threshold):
    """Set the given entries (rows of the view) to their gene's threshold, in the store's files."""
    data = np.load(counts.folder / "data.npy", mmap_mode="r+")
    totals = np.load(counts.folder / "row_sums.npy", mmap_mode="r+")
    for row, column in zip(counts.rows[rows], columns):
        start, stop = counts.indptr[row], counts.indptr[row + 1]
        position = start + int(np.flatnonzero(counts.files["indices"].read(start, stop) == column)[0])
        data[position] = threshold[column]
        totals[row] = data[start:stop].sum(dtype=np.float64)
    data.flush()
    totals.flush()


def prepare(source: DiskData, store, n_genes=500, genes=None, label_column=None, exclude_labels=(),
            drop_empty_cells=False, outlier_counts="keep", keep_genes=(), exclude_cells=None) -> DiskData:
    """`data.prepare` for a file read in chunks: the same checks, cells, genes, record and
    warnings, with the chosen counts written to the store folder `store`."""
    seconds = {}
    clock = time.time()
    if source.n_obs == 0 or source.n_vars == 0:
        raise DataError(f"the count matrix is empty ({source.n_obs} cells x {source.n_vars} genes)")
    _check_unique(source.obs_names, "cell", "make them unique first (adata.obs_names_make_unique())")
    exclude_labels = [str(lab) for lab in exclude_labels]
    record = {"n_cells_input": int(source.n_obs), "n_genes_input": int(source.n_vars)}
    cells = cells_kept(source.obs, label_column, exclude_labels, exclude_cells)
    record.update(label_column=label_column or "", excluded_labels=",".join(exclude_labels),
                  n_cells_excluded=int(source.n_obs - len(cells)))

    total, squares, nonzeros, _ = gene_statistics(source.row_chunks(cells), source.n_vars)
    seconds["gene_statistics"] = time.time() - clock
    clock = time.time()
    if genes is not None:
        selected = gene_positions(source.var_names, genes, source.var)
        record.update(gene_selection="given", n_genes_all_zero_dropped=0)
    else:
        present = np.flatnonzero(nonzeros > 0)
        if len(present) == 0:
            raise DataError("every gene has zero counts in the selected cells")
        record["n_genes_all_zero_dropped"] = int(source.n_vars - len(present))
        if n_genes and n_genes < len(present):
            if len(cells) < MIN_CELLS_GENE_SELECTION:
                raise DataError(f"Choosing {n_genes} highly variable genes (seurat_v3) needs at least "
                                f"{MIN_CELLS_GENE_SELECTION} cells; there are {len(cells)}. Keep all genes with "
                                f"--n-genes 0 (n_genes=0), or use more cells.")
            chunks_again = lambda: (chunk[:, present] for chunk in source.row_chunks(cells))  # noqa: E731
            selected = present[seurat_v3(chunks_again, total[present], squares[present], len(cells), int(n_genes))]
            record["gene_selection"] = "seurat_v3"
        else:
            selected = present
            record["gene_selection"] = "all"
        selected = _with_kept_genes(selected, keep_genes, source.var_names)
    record["n_genes_requested"] = int(n_genes or 0)
    seconds["gene_selection"] = time.time() - clock

    clock = time.time()
    nnz = int(nonzeros[selected].sum())
    totals = write_store(store, (chunk[:, selected] for chunk in source.row_chunks(cells)), len(cells),
                         len(selected), nnz)
    counts = DiskCounts(store)
    empty = totals == 0
    n_empty = int(empty.sum())
    if n_empty and not drop_empty_cells:
        raise DataError(f"{n_empty} of {len(cells)} cells have zero counts over the {len(selected)} selected "
                        f"genes; drop them with --drop-empty-cells (drop_empty_cells=True), or select more genes "
                        f"(--n-genes)")
    if n_empty:
        if n_empty == len(cells):
            raise DataError(f"all {n_empty} cells have zero counts over the selected genes")
        counts, cells = counts[~empty], cells[~empty]
    record.update(n_cells_empty_dropped=n_empty, n_cells=int(len(cells)), n_genes=int(len(selected)))
    seconds["store"] = time.time() - clock

    clock = time.time()
    rows, columns, values, threshold = outlier_entries(counts)
    if report_outliers(rows, columns, values, source.var_names[selected], outlier_counts, record):
        _clip_in_store(counts, rows, columns, threshold)
    seconds["outliers"] = time.time() - clock

    obs = source.obs.iloc[cells].copy()
    for column in obs.columns:
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            obs[column] = obs[column].cat.remove_unused_categories()
    uns = copy.deepcopy(dict(source.uns))
    uns["preprocessing"] = record
    return DiskData(source.path, source.layer, obs, source.var.iloc[selected].copy(), uns, X=counts,
                    seconds=seconds)


# -- outputs -------------------------------------------------------------------------------

OUTPUT_CHUNK_CELLS = 65536


def write_outputs(run, model, prepared: DiskData, split, hierarchy, batch_size: int, covariates=None, given=None,
                  truth=None) -> dict:
    """`outputs.write_outputs` a chunk of cells at a time: each chunk's latent and probabilities go
    straight into outputs.h5ad's obsm, its counts into X; only the clusters (and, with partial labels
    `given`, the class names) stay in memory."""
    from .files import atomic_path
    from .outputs import annotate, class_names, level_names, predict_outputs, run_metrics

    n = prepared.n_obs
    columns, named = {}, {}
    with atomic_path(run.outputs) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            obsm = handle.create_group("obsm")
            obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
            names = None
            for start, chunk in prepared.X.chunks(OUTPUT_CHUNK_CELLS):
                stop = start + chunk.shape[0]
                rows = None if covariates is None else covariates[start:stop]
                outputs = predict_outputs(model, chunk, batch_size, rows)
                names = names or level_names(hierarchy, outputs)
                part = anndata.AnnData(obs=pd.DataFrame(index=prepared.obs_names[start:stop]))
                annotate(part, outputs, names, model)
                for key, values in part.obsm.items():
                    if key not in obsm:
                        obsm.create_dataset(key, shape=(n, values.shape[1]), dtype=values.dtype)
                        obsm[key].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                    obsm[key][start:stop] = values
                for key in part.obs.columns:
                    columns.setdefault(key, []).append(part.obs[key])
                if given is not None:
                    for level, values in class_names(model, names, outputs, given[start:stop]).items():
                        named.setdefault(level, []).append(np.asarray(values, dtype=object))
                if start == 0:
                    write_elem(handle, "X", chunk)
                else:
                    sparse_dataset(handle["X"]).append(chunk)
            obs = prepared.obs.copy()
            obs["split"] = pd.Categorical(split, categories=["train", "validation", "test"])
            for key, parts in columns.items():
                obs[key] = pd.Categorical(np.concatenate([p.astype(str).to_numpy() for p in parts]),
                                          categories=parts[0].cat.categories)
            if given is not None:
                obs["labelled"] = (given >= 0).any(axis=1)
                for level, parts in named.items():
                    obs[f"scvae_{level}"] = pd.Categorical(np.concatenate(parts))
            metrics = run_metrics(model, names, _clusters(obs, names, model), obs, hierarchy, truth, given)
            uns = dict(prepared.uns)
            uns["scvae"] = {"model": metrics["model"], "clustering": model.clustering,
                            "metrics": {k: v for k, v in metrics.items() if k != "model"}}
            write_elem(handle, "obs", obs)
            write_elem(handle, "var", prepared.var)
            write_elem(handle, "uns", uns)
            for empty in ("layers", "obsp", "varm", "varp"):
                write_elem(handle, empty, {})
    return metrics


def _clusters(obs, names, model) -> list:
    """The clusters per level as `outputs.annotate` returns them, from the written obs columns."""
    if model.clustering == "none":
        return []
    if "scvae_cluster" in obs:
        return [obs["scvae_cluster"].astype(int).to_numpy()] * len(names)
    return [obs[f"scvae_{name}_cluster"].astype(int).to_numpy() for name in names
            if f"scvae_{name}_cluster" in obs]


def remove_store(folder) -> None:
    """Delete a store folder this module wrote (its four arrays and store.json), nothing else."""
    folder = Path(folder)
    for name in ("data.npy", "indices.npy", "indptr.npy", "row_sums.npy", "store.json"):
        if (folder / name).exists():
            (folder / name).unlink()
    if folder.exists() and not any(folder.iterdir()):
        os.rmdir(folder)
