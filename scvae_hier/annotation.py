"""Label transfer: a trained model names the cells of a new file (`scvae-hier annotate`).

The query's genes are matched to the model's by name (missing genes are refused by name); a batch
the model never saw is refused unless the user says which training batch to read it as, or asks
for it to be fitted with the rest of the model frozen (`fit_batches_epochs`, scvae_hier.query). The
output is the query AnnData as read (its own X kept when the counts came from a layer), with
per-level names, clusters and probabilities in obs and the latent in obsm["X_scvae"] (NaN rows for
cells without counts on the model's genes).
"""
from pathlib import Path

import anndata

from .data import file_counts, read_file
from .files import write_h5ad


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
                  save_model=None, novelty_cutoff=None, layer=None):
    """Annotate the cells of `query` (a count file) with the model in `run`; write `output` (.h5ad).
    fit_batches_epochs > 0: first fit the query's new batches for that many epochs (then `batch`
    must be None); save_model: a folder for that extended model; novelty_cutoff: as predict_levels;
    layer: the query's layer of counts ("X" for X; default: the model's training layer, as a query
    is often laid out as the reference was)."""
    from .api import load

    output = Path(output)
    if output.suffix != ".h5ad":
        raise ValueError(f"--output must be an .h5ad file, got {str(output)!r}.")
    if output.resolve() == Path(query).resolve():
        raise ValueError(f"--output {output} is the query file itself; write the annotation to another file.")
    model = load(run)
    adata, counts = counts_for_model(model, query, layer)
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
    if model.module.clustering != "none":
        table = model.predict_levels(counts, unassigned_below=unassigned_below, batch=batch,
                                     novelty_cutoff=novelty_cutoff)
        for column in table.columns:
            adata.obs[column] = table[column]
    adata.obsm["X_scvae"] = model.get_latent_representation(counts, batch=batch)
    adata.uns["scvae_annotation"] = {"run": str(run), "unassigned_below": float(unassigned_below),
                                     "novelty_cutoff": "" if novelty_cutoff is None else float(novelty_cutoff),
                                     "batch": "" if batch is None else str(batch),
                                     "fitted_batches": list(model.module.metadata.get("query_batches", [])),
                                     "query_epochs": int(fit_batches_epochs)}
    write_h5ad(adata, output)
    return adata
