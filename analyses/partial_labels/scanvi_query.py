"""scANVI (scvi-tools) as the peer of the reference-to-query settings of the partial-labels
experiment (issue 16): the label transfer a scvi-tools user would run instead of `scvae-hier annotate`.

    python analyses/partial_labels/run.py --query-inputs        # once, in this package's venv
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 /work/scvi_venv/bin/python analyses/partial_labels/scanvi_query.py \\
        [--seeds 0 1 2] [--only "query_kang_2donors (1256+1488)"]

Same cells and genes as run.py's query settings (query_inputs.json: the genes TreeVAE chose on the
reference cells), every reference cell labelled with its finest class. Two ways, as scvi-tools
documents them:
- "scanvi": scVI then scANVI on the reference without a batch covariate, the query predicted by it
  directly (run.py's "treevae" row: the reference trained without a batch covariate);
- "scanvi_scarches": scVI then scANVI on the reference with the query column as the batch, the query
  added by architecture surgery (`SCANVI.load_query_data`) and trained 100 epochs with weight decay
  0 (the scvi-tools scArches tutorial), then predicted (run.py's "treevae_batches_fitted").
scVI 100 epochs (early stopping off, 20 latent dimensions as our runs), scANVI 20 epochs, as
scanvi.py. The predicted leaf is mapped up the hierarchy and scored on every query cell like run.py.
Rows go to scanvi_results.csv as they finish; a rerun skips those already there. The validation
splits of readout_validation.py (`--query-inputs` there adds them, with their reference groups) run
the same way with `--only pbmc_val kang_val`.
"""
import argparse
import json
import time
from pathlib import Path

from scanvi import ROOT, SCANVI_EPOCHS, SCVI_EPOCHS, UNKNOWN, append, done_keys, level_scores, scanvi_batch_size

import anndata  # noqa: E402  (after scanvi, which sets the thread counts)
import numpy as np  # noqa: E402
import scvi  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
QUERY_EPOCHS = 2 if SCVI_EPOCHS == 2 else 100  # SCANVI_SMOKE: 2 epochs everywhere


def split(setting):
    """(reference, query, hierarchy paths, levels) of a setting in query_inputs.json: raw counts
    of the genes TreeVAE trained on, obs "scanvi_label" the finest class (query: Unknown)."""
    inputs = json.loads((HERE / "query_inputs.json").read_text())[setting]
    adata = anndata.read_h5ad(ROOT / inputs["data"])
    hierarchy = adata.uns["hierarchy"]
    label = str(hierarchy["label_column"])
    adata = adata[~adata.obs[label].astype(str).isin(inputs["exclude_labels"]), inputs["genes"]].copy()
    group = adata.obs[inputs["column"]].astype(str)
    is_query = group.isin(inputs["query"]).to_numpy()
    # the reference: the named groups (validation splits), else every other cell
    is_reference = group.isin(inputs["reference"]).to_numpy() if "reference" in inputs else ~is_query
    adata.obs["scanvi_label"] = np.where(is_query, UNKNOWN, adata.obs[label].astype(str))
    adata.obs["scanvi_batch"] = group
    paths = {leaf: tuple(str(c) for c in path) for leaf, path in hierarchy["paths"].items()}
    return adata[is_reference].copy(), adata[is_query].copy(), paths, label


def reference_model(reference, seed, batch):
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(reference, batch_key="scanvi_batch" if batch else None)
    vae = scvi.model.SCVI(reference, n_latent=20)
    vae.train(max_epochs=SCVI_EPOCHS, early_stopping=False, accelerator="cpu", enable_progress_bar=False)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN, labels_key="scanvi_label")
    model.train(max_epochs=SCANVI_EPOCHS, batch_size=scanvi_batch_size(model), accelerator="cpu",
                enable_progress_bar=False)
    return model


def predict(method, reference, query, seed):
    """The leaf scANVI gives every query cell."""
    model = reference_model(reference, seed, batch=method == "scanvi_scarches")
    if method == "scanvi":
        return np.asarray(model.predict(query), dtype=str)
    scvi.model.SCANVI.prepare_query_anndata(query, model)
    query_model = scvi.model.SCANVI.load_query_data(query, model)
    query_model.train(max_epochs=QUERY_EPOCHS, plan_kwargs={"weight_decay": 0.0}, check_val_every_n_epoch=10,
                      accelerator="cpu", enable_progress_bar=False)
    return np.asarray(query_model.predict(), dtype=str)


def run(setting, method, seed):
    reference, query, paths, label = split(setting)
    start = time.time()
    guess = predict(method, reference, query, seed)
    truth = np.array([paths[leaf] for leaf in query.obs[label].astype(str)])
    row = level_scores(truth, np.array([paths[g] for g in guess], dtype=object), paths)
    append(dict(row, setting=setting, method=method, seed=seed, n_scored=query.n_obs, n_labelled=reference.n_obs,
                seconds=round(time.time() - start, 1)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=None, help="settings (keys of query_inputs.json)")
    parser.add_argument("--methods", nargs="+", default=["scanvi", "scanvi_scarches"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = args.only or list(json.loads((HERE / "query_inputs.json").read_text()))
    for seed in args.seeds:
        for setting in settings:
            for method in args.methods:
                if (setting, method, seed) not in done_keys():
                    print(f"== {setting} {method} seed {seed}", flush=True)
                    run(setting, method, seed)
