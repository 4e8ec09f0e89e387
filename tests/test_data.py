"""Reading, checking, gene selection, splitting and batching, on slices of the shipped PBMC data."""
import gzip
import hashlib
import shutil

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scvae_hier.data import (CountBatches, DataError, file_checksum, prepare, read_counts,
                             split_cells, validate_counts, fold_cells)

from conftest import PBMC


@pytest.fixture(scope="module")
def pbmc_1000(pbmc):
    """1,000 real cells drawn from all ten populations."""
    rows = np.sort(np.random.default_rng(0).choice(pbmc.n_obs, 1000, replace=False))
    return pbmc[rows].copy()


@pytest.fixture(scope="module")
def small(pbmc):
    """40 real cells x 30 of their expressed genes, as integer counts (cells x genes)."""
    cells = pbmc[::229][:40]
    genes = np.flatnonzero(np.asarray(cells.X.sum(axis=0)).ravel() > 0)[:30]
    sub = cells[:, genes].copy()
    sub.X = sp.csr_matrix(sub.X, dtype=np.int32)
    return sub


def assert_same_counts(adata, small):
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert list(adata.obs_names) == list(small.obs_names)
    assert list(adata.var_names) == list(small.var_names)
    np.testing.assert_array_equal(adata.X.toarray(), small.X.toarray())


# -- readers -------------------------------------------------------------------------------

def test_read_shipped_h5ad(pbmc):
    """`pbmc` is read_counts(PBMC), read once per session (conftest.py)."""
    assert pbmc.shape == (9149, 8149)
    assert pbmc.X.format == "csr" and pbmc.X.dtype == np.float32
    validate_counts(pbmc.X)
    with h5py.File(PBMC, "r") as raw:  # the file itself, without reading it whole a second time
        assert raw["X"]["data"].dtype == np.int32  # the shipped file keeps integer counts
        assert raw["X"]["data"][:].sum(dtype=np.int64) == pbmc.X.sum(dtype=np.float64)
    assert pbmc.obs["source_library"].value_counts()["cd14_monocytes"] == 758
    for level in ["level_1", "level_2", "level_3", "level_4"]:
        assert level in pbmc.obs
    assert pbmc.uns["hierarchy"]["label_column"] == "source_library"


def _gzip(path):
    with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()


def _write_10x_folder(folder, small, v3):
    folder.mkdir()
    genes_x_cells = sp.coo_matrix(small.X.T)
    ids = small.var["gene_ids"].to_numpy()
    symbols = small.var_names.to_numpy()
    if v3:  # one antibody feature that the reader must leave out
        extra = sp.coo_matrix(np.full((1, small.n_obs), 7, dtype=np.int32))
        genes_x_cells = sp.vstack([genes_x_cells, extra]).tocoo()
        features = pd.DataFrame({"id": list(ids) + ["CD3_TotalSeqB"],
                                 "name": list(symbols) + ["CD3"],
                                 "type": ["Gene Expression"] * len(ids) + ["Antibody Capture"]})
        feature_file = folder / "features.tsv"
    else:
        features = pd.DataFrame({"id": ids, "name": symbols})
        feature_file = folder / "genes.tsv"
    scipy.io.mmwrite(folder / "matrix.mtx", genes_x_cells, field="integer")
    features.to_csv(feature_file, sep="\t", header=False, index=False)
    pd.Series(small.obs_names).to_csv(folder / "barcodes.tsv", header=False, index=False)
    if v3:
        for name in ["matrix.mtx", "features.tsv", "barcodes.tsv"]:
            _gzip(folder / name)


def test_read_10x_v3_folder(small, tmp_path):
    _write_10x_folder(tmp_path / "v3", small, v3=True)
    assert sorted(p.name for p in (tmp_path / "v3").iterdir()) == [
        "barcodes.tsv.gz", "features.tsv.gz", "matrix.mtx.gz"]
    adata = read_counts(tmp_path / "v3")
    assert_same_counts(adata, small)
    assert list(adata.var["gene_ids"]) == list(small.var["gene_ids"])


def test_read_10x_v2_folder(small, tmp_path):
    _write_10x_folder(tmp_path / "v2", small, v3=False)
    assert_same_counts(read_counts(tmp_path / "v2"), small)


def test_read_10x_folder_with_duplicate_symbols_makes_them_unique(small, tmp_path):
    dup = small.copy()
    dup.var_names = ["GENE"] * dup.n_vars
    _write_10x_folder(tmp_path / "dup", dup, v3=False)
    adata = read_counts(tmp_path / "dup")
    assert adata.var_names.is_unique and adata.var_names[1] == "GENE-1"


def test_read_10x_h5(small, tmp_path):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    csc_genes_x_cells = sp.csr_matrix(small.X)  # CSR of cells x genes == CSC of genes x cells
    strings = lambda values: np.array([str(v).encode() for v in values])  # noqa: E731
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"] = csc_genes_x_cells.data
        m["indices"] = csc_genes_x_cells.indices.astype(np.int64)
        m["indptr"] = csc_genes_x_cells.indptr.astype(np.int64)
        m["shape"] = np.array([small.n_vars, small.n_obs], dtype=np.int32)
        m["barcodes"] = strings(small.obs_names)
        feats = m.create_group("features")
        feats["id"] = strings(small.var["gene_ids"])
        feats["name"] = strings(small.var_names)
        feats["feature_type"] = strings(["Gene Expression"] * small.n_vars)
        feats["genome"] = strings(["GRCh38"] * small.n_vars)
    assert_same_counts(read_counts(path), small)


def test_read_h5ad_layer(small, tmp_path):
    adata = small.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray() / 3.0).astype(np.float32))
    adata.write_h5ad(tmp_path / "layered.h5ad")
    assert_same_counts(read_counts(tmp_path / "layered.h5ad", layer="counts"), small)
    # Without the layer the log data are read, and the check rejects them.
    with pytest.raises(DataError, match="non-integer"):
        validate_counts(read_counts(tmp_path / "layered.h5ad").X)
    with pytest.raises(DataError, match=r"no layer 'raw'; available layers: \['counts'\]"):
        read_counts(tmp_path / "layered.h5ad", layer="raw")


def test_read_scvae_style_loom(small, tmp_path):
    import loompy
    path = tmp_path / "pbmc.loom"
    loompy.create(str(path), sp.coo_matrix(small.X.T),
                  row_attrs={"Gene": small.var_names.to_numpy()},
                  col_attrs={"CellID": small.obs_names.to_numpy(),
                             "ClusterName": small.obs["source_library"].astype(str).to_numpy()})
    adata = read_counts(path)
    assert_same_counts(adata, small)
    assert list(adata.obs["ClusterName"]) == list(small.obs["source_library"].astype(str))


def test_read_anndata_written_loom(small, tmp_path):
    plain = anndata.AnnData(X=small.X.copy(), obs=pd.DataFrame(index=small.obs_names),
                            var=pd.DataFrame(index=small.var_names))
    plain.write_loom(tmp_path / "plain.loom")
    assert_same_counts(read_counts(tmp_path / "plain.loom"), small)


def test_read_errors_name_the_path_and_formats(tmp_path):
    with pytest.raises(DataError, match=r"'.*missing\.h5ad' does not exist; supported formats"):
        read_counts(tmp_path / "missing.h5ad")
    (tmp_path / "counts.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"unknown format of '.*counts\.csv'.*10x matrix folder"):
        read_counts(tmp_path / "counts.csv")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="not a 10x matrix folder"):
        read_counts(tmp_path / "empty_folder")
    (tmp_path / "broken.h5ad").write_text("not hdf5")
    with pytest.raises(DataError, match=r"cannot read '.*broken\.h5ad'"):
        read_counts(tmp_path / "broken.h5ad")


# -- count checks --------------------------------------------------------------------------

@pytest.mark.parametrize("bad_value, problem", [(np.nan, "NaN or infinite"),
                                                (np.inf, "NaN or infinite"),
                                                (-2.0, "negative"),
                                                (1.5, "non-integer")])
@pytest.mark.parametrize("sparse", [True, False])
def test_validate_counts_rejects_non_counts(small, bad_value, problem, sparse):
    X = small.X.astype(np.float32).toarray()
    X[3, 7] = bad_value
    X[5, 2] = bad_value
    X = sp.csr_matrix(X) if sparse else X
    with pytest.raises(DataError) as err:
        validate_counts(X)
    message = str(err.value)
    assert f"2 {problem} value(s), e.g. row 3, column 7" in message
    assert "raw UMI counts" in message and "--layer counts" in message


def test_validate_counts_accepts_integer_counts(small):
    validate_counts(small.X)
    validate_counts(small.X.astype(np.float64).toarray())


def test_prepare_rejects_normalised_data(small):
    adata = small.copy()
    adata.X = sp.csr_matrix(adata.X.toarray() / 2.5)
    with pytest.raises(DataError, match="non-integer"):
        prepare(adata, n_genes=None)


# -- prepare -------------------------------------------------------------------------------

def test_prepare_selects_seurat_v3_genes_in_original_order(pbmc_1000):
    import scanpy as sc
    out = prepare(pbmc_1000, n_genes=500)
    assert out.shape == (1000, 500)
    assert out.X.format == "csr" and out.X.dtype == np.float32
    position = pbmc_1000.var_names.get_indexer(out.var_names)
    assert np.all(np.diff(position) > 0)
    reference = pbmc_1000.copy()
    sc.pp.highly_variable_genes(reference, flavor="seurat_v3", n_top_genes=500)
    assert set(out.var_names) == set(reference.var_names[reference.var["highly_variable"]])
    np.testing.assert_array_equal(out.X.toarray(), pbmc_1000[:, out.var_names].X.toarray())
    record = out.uns["preprocessing"]
    assert record["gene_selection"] == "seurat_v3" and record["n_genes"] == 500
    assert "hierarchy" in out.uns and list(out.obs.columns) == list(pbmc_1000.obs.columns)


def test_prepare_without_gene_selection_drops_all_zero_genes(small, pbmc):
    cells = pbmc[:50].copy()
    zero = int((cells.X.getnnz(axis=0) == 0).sum())
    assert zero > 0
    out = prepare(cells, n_genes=None)
    assert out.n_vars == pbmc.n_vars - zero
    assert out.uns["preprocessing"]["n_genes_all_zero_dropped"] == zero
    assert prepare(cells, n_genes=10**6).n_vars == out.n_vars
    assert out.uns["preprocessing"]["gene_selection"] == "all"


def test_prepare_with_given_genes_keeps_their_order(pbmc_1000):
    genes = list(pbmc_1000.var_names[[40, 3, 900, 12]])
    out = prepare(pbmc_1000, genes=genes, drop_empty_cells=True)
    assert list(out.var_names) == genes
    assert out.uns["preprocessing"]["gene_selection"] == "given"
    with pytest.raises(DataError, match=r"2 of the 4 required genes are missing from the data: "
                                        r"NOT_A_GENE, ALSO_MISSING"):
        prepare(pbmc_1000, genes=genes[:2] + ["NOT_A_GENE", "ALSO_MISSING"])


def test_genes_under_another_var_column_are_pointed_to(pbmc_1000, tmp_path):
    """A query whose gene names are IDs while its symbols sit in a var column (Kang's file has
    both): the refusal names the column that holds the model's genes and how to use it."""
    genes = list(pbmc_1000.var_names[[40, 3, 900, 12]])
    query = pbmc_1000.copy()
    query.var["symbol"] = query.var_names.astype(str)
    query.var["id"] = [f"ENSG{i:011d}" for i in range(query.n_vars)]
    query.var_names = query.var["id"].to_numpy()
    with pytest.raises(DataError, match=r"4 of the 4 required genes are missing.*var\['symbol'\] holds 4 of them"):
        prepare(query, genes=genes)
    from scvae_hier import ondisk                                                  # out of core: the same
    query.X = sp.csr_matrix(query.X)
    query.write_h5ad(tmp_path / "query.h5ad")
    with pytest.raises(DataError, match=r"4 of the 4 required genes are missing.*var\['symbol'\] holds 4 of them"):
        ondisk.prepare(ondisk.read(tmp_path / "query.h5ad"), tmp_path / "store", genes=genes)
    query.var_names = query.var["symbol"].astype(str).to_numpy()                  # the fix it names
    assert list(prepare(query, genes=genes, drop_empty_cells=True).var_names) == genes


def test_prepare_excludes_labels(pbmc_1000):
    n_mono = int((pbmc_1000.obs["source_library"] == "cd14_monocytes").sum())
    assert n_mono > 0
    out = prepare(pbmc_1000, n_genes=200, label_column="source_library",
                  exclude_labels=["cd14_monocytes"])
    assert out.n_obs == 1000 - n_mono
    assert "cd14_monocytes" not in out.obs["source_library"].cat.categories
    assert "Monocyte" not in out.obs["level_2"].cat.categories
    assert out.uns["preprocessing"]["n_cells_excluded"] == n_mono
    assert out.uns["preprocessing"]["excluded_labels"] == "cd14_monocytes"


def test_prepare_label_errors(pbmc_1000):
    with pytest.raises(DataError, match=r"no label column 'cell_type'; available obs columns: "
                                        r"\['source_library'"):
        prepare(pbmc_1000, label_column="cell_type", exclude_labels=["b_cells"])
    with pytest.raises(DataError, match=r"excluded label\(s\) \['monocytes'\] do not occur in "
                                        r"obs\['source_library'\]"):
        prepare(pbmc_1000, label_column="source_library", exclude_labels=["monocytes"])
    with pytest.raises(DataError, match=r"exclude_labels needs a label column \(--label-column\)"):
        prepare(pbmc_1000, exclude_labels=["b_cells"])
    every = list(pbmc_1000.obs["source_library"].unique())
    with pytest.raises(DataError, match=r"excluding \[.*\] leaves no cells"):
        prepare(pbmc_1000, label_column="source_library", exclude_labels=every)


def test_prepare_empty_cells(pbmc_1000):
    # Three sparsely expressed real genes leave many cells with no counts at all.
    detected = pbmc_1000.X.getnnz(axis=0)
    genes = list(pbmc_1000.var_names[np.flatnonzero((detected > 0) & (detected < 20))[:3]])
    totals = np.asarray(pbmc_1000[:, genes].X.sum(axis=1)).ravel()
    n_empty = int((totals == 0).sum())
    assert 0 < n_empty < 1000
    with pytest.raises(DataError, match=rf"{n_empty} of 1000 cells have zero counts over the 3 "
                                        rf"selected genes; drop them with --drop-empty-cells"):
        prepare(pbmc_1000, genes=genes)
    out = prepare(pbmc_1000, genes=genes, drop_empty_cells=True)
    assert out.n_obs == 1000 - n_empty
    assert np.all(np.asarray(out.X.sum(axis=1)).ravel() > 0)
    assert list(out.obs_names) == list(pbmc_1000.obs_names[totals > 0])
    assert out.uns["preprocessing"]["n_cells_empty_dropped"] == n_empty


def test_prepare_empty_matrix(small):
    with pytest.raises(DataError, match="empty"):
        prepare(small[:0].copy())


def test_prepared_data_writes_to_h5ad(small, tmp_path):
    out = prepare(small, n_genes=None, label_column="source_library",
                  drop_empty_cells=True)
    out.write_h5ad(tmp_path / "prepared.h5ad")
    back = read_counts(tmp_path / "prepared.h5ad")
    assert back.uns["preprocessing"]["n_genes"] == out.n_vars


# -- splits and checksums ------------------------------------------------------------------

def test_split_cells():
    split = split_cells(9149, seed=3)
    names, counts = np.unique(split, return_counts=True)
    assert dict(zip(names, counts)) == {"train": 7319, "validation": 915, "test": 915}
    np.testing.assert_array_equal(split, split_cells(9149, seed=3))
    assert np.any(split != split_cells(9149, seed=4))
    assert sorted(split_cells(3)) == ["test", "train", "validation"]
    assert list(np.unique(split_cells(10, (0.5, 0.5, 0.0)))) == ["train", "validation"]
    with pytest.raises(DataError, match="sum to 1"):
        split_cells(100, (0.8, 0.1, 0.2))


def test_file_checksum(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"counts")
    assert file_checksum(path) == hashlib.sha256(b"counts").hexdigest()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(b"more")
    before = file_checksum(tmp_path)
    (tmp_path / "sub" / "b.txt").write_bytes(b"changed")
    assert file_checksum(tmp_path) != before
    with pytest.raises(DataError, match="does not exist"):
        file_checksum(tmp_path / "nope")


# -- batches -------------------------------------------------------------------------------

def test_count_batches_in_order(pbmc_1000):
    X = pbmc_1000.X[:300]
    batches = CountBatches(X, batch_size=64)
    assert len(batches) == 5
    parts = [batches[i]["counts"] for i in range(len(batches))]
    assert all(p.dtype == np.float32 and isinstance(p, np.ndarray) for p in parts)
    assert [len(p) for p in parts] == [64, 64, 64, 64, 44]
    np.testing.assert_array_equal(np.concatenate(parts), X.toarray())
    with pytest.raises(IndexError):
        batches[5]
    dense = CountBatches(X.toarray(), batch_size=64)
    np.testing.assert_array_equal(dense[4]["counts"], parts[4])
    assert set(batches[0]) == {"counts"}  # covariates only for a model trained with them


def _epoch(batches):
    xs, rows = zip(*((batches[i]["counts"], batches[i]["covariates"]) for i in range(len(batches))))
    return np.concatenate(xs), np.concatenate(rows)


def test_count_batches_shuffle(pbmc_1000):
    X = pbmc_1000.X[:300]
    batches = CountBatches(X, batch_size=64, shuffle=True, seed=7, covariates=np.arange(300))
    x0, rows0 = _epoch(batches)
    np.testing.assert_array_equal(np.sort(rows0), np.arange(300))  # each row exactly once
    np.testing.assert_array_equal(x0, X[rows0].toarray())
    assert np.any(rows0 != np.arange(300))
    batches.on_epoch_end()
    assert batches.epoch == 1
    x1, rows1 = _epoch(batches)
    np.testing.assert_array_equal(np.sort(rows1), np.arange(300))
    np.testing.assert_array_equal(x1, X[rows1].toarray())
    assert np.any(rows1 != rows0)
    # The order depends only on (seed, epoch): a resumed dataset reproduces it.
    resumed = CountBatches(X, batch_size=64, shuffle=True, seed=7, covariates=np.arange(300))
    resumed.epoch = 1
    np.testing.assert_array_equal(_epoch(resumed)[1], rows1)
    np.testing.assert_array_equal(rows0, np.random.default_rng([7, 0]).permutation(300))
    other_seed = CountBatches(X, batch_size=64, shuffle=True, seed=8, covariates=np.arange(300))
    assert np.any(_epoch(other_seed)[1] != rows0)


def test_count_batches_under_keras_fit(small):
    """Keras' fit() calls on_epoch_end once before training, so fit epoch e uses the order of
    `epoch` e + 1; setting `epoch = initial_epoch` before a resumed fit gives the same orders."""
    import keras

    def run(initial_epoch):
        seen = []

        class Recording(CountBatches):
            def __getitem__(self, index):
                seen.append((self.epoch, index))
                batch = super().__getitem__(index)
                return batch["counts"], batch["covariates"]  # (inputs, targets) for the toy regression

        X = small.X.astype(np.float32)
        batches = Recording(X, batch_size=16, shuffle=True, seed=1,
                            covariates=np.zeros((small.n_obs, 1), np.float32))
        batches.epoch = initial_epoch
        model = keras.Sequential([keras.Input((small.n_vars,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse", jit_compile=False)
        model.fit(batches, epochs=3, initial_epoch=initial_epoch, shuffle=False, verbose=0)
        return [s for s in seen if s[0] > initial_epoch]  # drop Keras' shape-probing calls

    full = run(0)
    assert full == [(e, i) for e in (1, 2, 3) for i in range(3)]
    assert run(2) == [(3, i) for i in range(3)]


def test_folds_test_every_cell_once_and_draw_validation_from_the_rest():
    folds = [fold_cells(1003, 5, k, 0.1, seed=2) for k in range(5)]
    tested = np.stack([f == "test" for f in folds])
    np.testing.assert_array_equal(tested.sum(0), np.ones(1003))  # each cell tested exactly once
    assert sorted(tested.sum(1)) == [200, 200, 201, 201, 201]
    for f in folds:
        assert (f == "validation").sum() == 100 and (f == "train").sum() == 1003 - 100 - (f == "test").sum()
    np.testing.assert_array_equal(folds[0], fold_cells(1003, 5, 0, 0.1, seed=2))
    assert np.any(folds[0] != fold_cells(1003, 5, 0, 0.1, seed=3))
    # Stratified by label: a 9% class is in every test fold in proportion (18 of 200 cells).
    labels = np.where(np.arange(1003) < 90, "stem", "other")
    for k in range(5):
        test = fold_cells(1003, 5, k, 0.1, seed=2, labels=labels) == "test"
        assert 18 <= (labels[test] == "stem").sum() <= 18 + 1
    with pytest.raises(DataError, match="--fold must be in 0..4"):
        fold_cells(100, 5, 5)
    with pytest.raises(DataError, match="leaves no training cells"):
        fold_cells(100, 5, 0, 0.85)
