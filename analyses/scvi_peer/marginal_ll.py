"""Held-out log-likelihood: scVI's importance-weighted bound on each fold's test cells, beside
TreeVAE's from the issue-12 experiment (same cells, genes and batch covariate; 500 draws each).

    .venv/bin/python analyses/scvi_peer/export_folds.py analyses/tree.yaml analyses/kang.yaml   # once
    /work/scvi_venv/bin/python analyses/scvi_peer/marginal_ll.py pbmc data/pbmc.h5ad [FOLD ...] [--nb] [--latent 20]
    /work/scvi_venv/bin/python analyses/scvi_peer/marginal_ll.py kang2018 data/kang2018.h5ad
    .venv/bin/python analyses/scvi_peer/marginal_ll.py --table      # TreeVAE against scVI, per dataset

Both bounds are log p(x | observed library size) in nats per cell (scVI with its default observed
library; TreeVAE with `library_size: observed`), each count law with its log x! term, so the
figures compare directly: higher is a better fit of held-out cells. scVI runs with scvi-tools'
defaults (ZINB, 10 latent dimensions, its epoch count for the cell number), or with a negative
binomial (`--nb`, TreeVAE's law), and with TreeVAE's 20 latent dimensions (`--latent 20`). Rows are appended to marginal_ll.csv as each fold finishes; a
rerun skips what is there.
"""
import os
import sys
import time
from pathlib import Path

for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(name, "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "marginal_ll.csv"
N_SAMPLES = 500                       # the experiment's iwae_samples
EXPERIMENTS = {"pbmc": HERE.parent / "results_tree", "kang2018": HERE.parent / "results_kang"}


def done():
    return set() if not RESULTS.is_file() else set(zip(*pd.read_csv(RESULTS)[["data", "fold", "model"]].T.values))


def run(name, data, folds, nb=False, n_latent=None, seed=0):
    import scvi
    import torch
    from scvi_leiden import fold_cells

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cells, adata = fold_cells(name, data)
    model_name = ("scVI, negative binomial" if nb else "scVI (defaults: ZINB)") + \
        (f", {n_latent} latent dimensions" if n_latent else "")
    settings = {**({"gene_likelihood": "nb"} if nb else {}), **({"n_latent": n_latent} if n_latent else {})}
    for fold in folds:
        if (name, fold, model_name) in done():
            continue
        split = cells[f"fold_{fold}"].to_numpy()
        train, test = adata[split != "test"].copy(), adata[split == "test"].copy()
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(train, batch_key="batch")
        model = scvi.model.SCVI(train, **settings)
        start = time.time()
        model.train(accelerator="cpu", enable_progress_bar=False)
        seconds = time.time() - start
        torch.manual_seed(seed)
        per_cell = np.asarray(model.get_marginal_ll(test, n_mc_samples=N_SAMPLES, return_mean=False))
        row = pd.DataFrame([dict(data=name, fold=fold, model=model_name, n_samples=N_SAMPLES,
                                 marginal_ll=float(per_cell.mean()), elbo=float(model.get_elbo(test)),
                                 n_cells=test.n_obs, epochs=model.history["elbo_train"].shape[0],
                                 train_seconds=seconds)])
        row.to_csv(RESULTS, mode="a", header=not RESULTS.is_file(), index=False)
        print(f"{name} fold {fold} {model_name}: log p(x) >= {per_cell.mean():.2f} per cell "
              f"({test.n_obs} test cells, {seconds:.0f} s)", flush=True)


def table():
    """Mean and spread over the folds: TreeVAE (the experiment's runs.csv) against each scVI, and
    TreeVAE's lead per fold (the same test cells, so paired)."""
    scvi_rows = pd.read_csv(RESULTS)
    lines = ["| data | model | log p(x) >= (nats per test cell), mean over folds (min to max) | ELBO | "
             "TreeVAE minus this, per fold: mean (min to max) | folds |", "|---|---|---|---|---|---|"]
    for name, results in EXPERIMENTS.items():
        runs = pd.read_csv(results / "runs.csv")
        ours = runs[(runs.group == "TreeVAE Normal") & (runs.level == "level_1")].copy()
        ours["fold"] = ours["run"].str.extract(r"-f(\d+)$", expand=False).astype(int)
        ours = ours.assign(model="TreeVAE (the experiment's default)", marginal_ll=ours["iwae"])
        tree = ours.set_index("fold")["marginal_ll"]
        for model, rows in pd.concat([ours, scvi_rows[scvi_rows.data == name]]).groupby("model", sort=False):
            ll, lead = rows["marginal_ll"], tree[rows["fold"]].to_numpy() - rows["marginal_ll"].to_numpy()
            paired = "-" if model.startswith("TreeVAE") else \
                f"{lead.mean():+.2f} ({lead.min():+.2f} to {lead.max():+.2f})"
            lines.append(f"| {name} | {model} | {ll.mean():.1f} ({ll.min():.1f} to {ll.max():.1f}) | "
                         f"{rows['elbo'].mean():.1f} | {paired} | "
                         f"{', '.join(str(f) for f in sorted(rows['fold']))} |")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        table()
    else:
        arguments = sys.argv[3:]
        n_latent = int(arguments[arguments.index("--latent") + 1]) if "--latent" in arguments else None
        folds = [int(a) for i, a in enumerate(arguments) if a.isdigit() and (i == 0 or arguments[i - 1] != "--latent")]
        run(sys.argv[1], sys.argv[2], folds or range(5), nb="--nb" in arguments, n_latent=n_latent)
