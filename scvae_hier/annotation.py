"""Label transfer: a trained model names the cells of a new file (`scvae-hier annotate`).

The query's genes are matched to the model's by name (missing genes are refused by name, or added
as zero counts when the user asks: `prepare_query_anndata`, `--missing-genes zeros`); a batch
the model never saw is refused unless the user says which training batch to read it as, or asks
for it to be fitted with the rest of the model frozen (`fit_batches_epochs`, scvae_hier.query). The
output is the query AnnData as read (its own X kept when the counts came from a layer), with
per-level names, clusters and probabilities in obs, each level's probability of every class in
obsm["scvae_<level>_probabilities"] (columns: uns["scvae_annotation"]["classes"][level]) and the
latent in obsm["X_scvae"] (NaN rows for cells without counts on the model's genes).
"""
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .choices import MISSING_GENES, check_calling_rules, check_choice
from .data import DataError, SetupError, file_counts, read_file
from .files import write_h5ad


ESTIMATE_CELLS = 2000  # cells read for the warning's share of expected counts on missing genes


class MissingGenesWarning(UserWarning):
    """Genes of the model were absent from a query and were added as zero counts."""


def prepare_query_anndata(adata, model, batch=None) -> anndata.AnnData:
    """`adata` with every gene of `model` (a trained scvae-hier model): the genes it lacks are
    appended as zero counts in X and in every layer, with a MissingGenesWarning naming them, as
    scvi-tools' `prepare_query_anndata` does for scArches. The encoder then reads those genes as
    not expressed, so a cell that expresses them loses that evidence; the README ("Genes missing
    from a query") measures what it costs. Returns `adata` itself when nothing is missing; refuses
    a query that shares no gene with the model (names on another scheme, e.g. Ensembl IDs).
    batch: the training batch the query will be read as, if any (for the warning's estimate)."""
    genes = [str(g) for g in model.module.metadata["genes"]]
    names = adata.var_names.astype(str)
    present = set(names)
    missing = [g for g in genes if g not in present]
    if not missing:
        return adata
    if len(missing) == len(genes):
        raise DataError(f"The query shares none of the model's {len(genes)} genes (the model's start "
                        f"{genes[:3]}, the query's {list(names[:3])}): gene names on another scheme? "
                        f"Set adata.var_names to the scheme the model was trained on.")
    zeros = sp.csr_matrix((adata.n_obs, len(missing)), dtype=np.float32)

    def padded(matrix):
        return sp.hstack([sp.csr_matrix(matrix), zeros.astype(matrix.dtype)], format="csr")

    var = pd.concat([adata.var, pd.DataFrame(index=pd.Index(missing, name=adata.var_names.name))])
    out = anndata.AnnData(padded(adata.X), obs=adata.obs.copy(), var=var, uns=dict(adata.uns),
                          obsm=dict(adata.obsm), layers={k: padded(v) for k, v in adata.layers.items()})
    out.var["missing_from_query"] = out.var_names.isin(missing)
    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    warnings.warn(f"{len(missing)} of the model's {len(genes)} genes are missing from the query and were added as zero "
                  f"counts: {shown}.{_expected_share(model, out, missing, batch)} The model reads them as not expressed; what "
                  f"that costs grows with the share of the counts they carry (README, \"Genes missing from a "
                  f"query\").", MissingGenesWarning, stacklevel=2)
    return out


def _expected_share(model, padded, missing, batch=None) -> str:
    """How much of these cells' counts the model expects on the missing genes (its denoised
    expression of the padded query), as a sentence; "" where the model cannot read the query yet
    (a batch it never saw, empty cells), which the caller's next step reports. At most
    ESTIMATE_CELLS cells are read."""
    cells = padded
    if padded.n_obs > ESTIMATE_CELLS:       # a mean: a seeded sample of cells gives it, not a second full pass
        cells = padded[np.sort(np.random.default_rng(0).choice(padded.n_obs, ESTIMATE_CELLS, replace=False))]
    try:
        expression = model.get_normalized_expression(cells, gene_list=missing, batch=batch).to_numpy()
    except (SetupError, DataError):
        return ""
    return f" The model expects {np.nanmean(expression.sum(axis=1)):.0%} of these cells' counts on them."


def counts_for_model(model, path, layer=None):
    """(the file as its user keeps it, an AnnData of its raw counts for the model): `layer` is the
    file's layer of counts ("X" for X; default: the model's training layer, as a query is often
    laid out as the reference was)."""
    trained_layer = model.module.metadata.get("layer")
    layer = trained_layer if layer is None else (None if layer == "X" else layer)
    adata = read_file(path)
    counts = anndata.AnnData(file_counts(adata, layer, path), obs=adata.obs, var=adata.var)
    if trained_layer:        # where the model reads its counts from (its training layout)
        counts.layers[trained_layer] = counts.X
    return adata, counts


def annotate_file(run, query, output, unassigned_below=0.0, batch=None, drop_empty_cells=False, fit_batches_epochs=0,
                  save_model=None, novelty_cutoff=None, layer=None, missing_genes="refuse"):
    """Annotate the cells of `query` (a count file) with the model in `run`; write `output` (.h5ad).
    fit_batches_epochs > 0: first fit the query's new batches for that many epochs (then `batch`
    must be None); save_model: a folder for that extended model; novelty_cutoff: as predict_levels;
    layer: the query's layer of counts ("X" for X; default: the model's training layer, as a query
    is often laid out as the reference was); missing_genes: "refuse" the query when it lacks some
    of the model's genes, or add them as "zeros" (`prepare_query_anndata`)."""
    from .api import load

    check_choice("missing_genes", missing_genes, MISSING_GENES)
    check_calling_rules(unassigned_below, novelty_cutoff)

    output = Path(output)
    if output.suffix != ".h5ad":
        raise ValueError(f"--output must be an .h5ad file, got {str(output)!r}.")
    if output.resolve() == Path(query).resolve():
        raise ValueError(f"--output {output} is the query file itself; write the annotation to another file.")
    model = load(run)
    adata, counts = counts_for_model(model, query, layer)
    added = []
    if missing_genes == "zeros":
        counts = prepare_query_anndata(counts, model, batch=batch)
        added = list(counts.var_names[counts.var["missing_from_query"]]) if "missing_from_query" in counts.var else []
    if drop_empty_cells:
        model.module.metadata["drop_empty_cells"] = True
    if fit_batches_epochs:
        if batch is not None:
            raise ValueError("Give either --batch (read the query as a training batch) or --fit-new-batches, not both.")
        model = model.fit_new_batches(counts, max_epochs=fit_batches_epochs)
        if save_model:
            model.save(save_model)
    elif save_model:
        raise ValueError("--save-model saves the model extended by --fit-new-batches; without it the model is the run's.")
    table, probabilities, adata.obsm["X_scvae"] = model._query_results(counts, batch, unassigned_below, novelty_cutoff)
    if table is not None:
        for column in table.columns:
            adata.obs[column] = table[column]
    for level, by_class in probabilities.items():
        adata.obsm[f"scvae_{level}_probabilities"] = by_class.to_numpy()
    classes = {level: list(by_class.columns) for level, by_class in probabilities.items()}
    adata.uns["scvae_annotation"] = {"run": str(run), "classes": classes, "unassigned_below": float(unassigned_below),
                                     "novelty_cutoff": "" if novelty_cutoff is None else float(novelty_cutoff),
                                     "batch": "" if batch is None else str(batch),
                                     "fitted_batches": list(model.module.metadata.get("query_batches", [])),
                                     "query_epochs": int(fit_batches_epochs), "genes_added_as_zeros": added}
    write_h5ad(adata, output)
    return adata
