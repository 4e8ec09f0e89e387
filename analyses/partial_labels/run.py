"""Partial labels experiment (issue 16): semi-supervised TreeVAE against a flat baseline.

    python analyses/partial_labels/run.py [--seeds 0 1 2] [--only NAME ...] [--models tree tree_compact mixture indmom momix]

Every setting trains one run per seed (one thread each, run folders in runs/partial/, not
committed) and appends one row per run to analyses/partial_labels/results.csv as it finishes; a
rerun skips the rows already there, so the experiment is resumable.

Scores are on cells whose labels the model never saw (no label at any level; for reference-to-
query settings, the query cells): per-level ARI, accuracy and macro F1 of the model's named
predictions against the true classes, scHPL's hierarchical F1 and the share of cells whose
predicted path is a path of the annotated hierarchy. Baseline ("lr"): logistic regression on the
latent of the same model trained without labels (one per seed), fitted on the same labelled cells
at the finest revealed level and mapped up the hierarchy; and that unsupervised run's own
clusters on the same cells ("treevae_unsupervised", ARI only), the model the labels should not make
worse. Reference-to-query settings run twice:
without a batch covariate (`treevae`, `lr_same_latent`), and with the reference's batches as a
covariate, the query read as the largest reference batch or its batches fitted with the rest
frozen (`treevae_batch_as_<batch>`, `treevae_batches_fitted`; query ELBOs in query_batches.txt).
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, adjusted_rand_score, f1_score  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scvae_hier.data import read_counts  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402
from scvae_hier.metrics import hierarchical_f1  # noqa: E402
from scvae_hier.options import TrainOptions  # noqa: E402
from scvae_hier.training import labels_table, prepare_cells, resolve_hierarchy, train  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.csv"
RUNS = ROOT / "runs" / "partial"
PBMC = dict(data=str(ROOT / "data/pbmc.h5ad"), model="tree", exclude_labels=("cd14_monocytes",),
            batch_key="source_dataset", library_size="observed", dispersion="gene", n_genes=500,
            usage_level_weights=(0.1, 0.1, 1.0, 1.0), prior_probabilities="learnable", xla=False,
            epochs=200, patience=20)
if os.environ.get("PARTIAL_SMOKE"):  # a quick end-to-end check of this script: 3 epochs, results in /tmp
    PBMC.update(epochs=3, patience=3)
    RUNS, RESULTS = Path("/tmp/partial_smoke"), Path("/tmp/partial_smoke.csv")
SETTINGS = {  # name: options on top of PBMC (labelled: LEVEL=FRACTION of cells revealed)
    "fine_1pct": dict(labelled=("level_4=0.01",)),
    "fine_5pct": dict(labelled=("level_4=0.05",)),
    "fine_10pct": dict(labelled=("level_4=0.10",)),
    "l1_1pct": dict(labelled=("level_1=0.01",)),
    "l1_5pct": dict(labelled=("level_1=0.05",)),
    "l1_10pct": dict(labelled=("level_1=0.10",)),
    "l2_10pct_fine_1pct": dict(labelled=("level_2=0.10", "level_4=0.01")),
    "unknown_cd14": dict(exclude_labels=(), hide_labels=("cd14_monocytes",), novel_classes=1,
                         labelled=("level_4=0.05",)),
    "l12_5pct": dict(labelled=("level_2=0.05",)),
    "l1_1pct_markers": dict(labelled=("level_1=0.01",), markers=("CD8 T=CD8A,CD8B",)),
    # 2,000 highly variable genes instead of 500 (2026-12-06): the same cells and masks (a mask
    # depends on the seed and the labels only); scanvi.py reads the genes from the run folders
    "fine_5pct_2000genes": dict(labelled=("level_4=0.05",), n_genes=2000),
    "fine_10pct_2000genes": dict(labelled=("level_4=0.10",), n_genes=2000),
    "l1_1pct_2000genes": dict(labelled=("level_1=0.01",), n_genes=2000),
    # the second study: level-1 labels (Lymphoid / Myeloid) for 1%, donors as the batch
    "kang_l1_1pct": dict(data=str(ROOT / "data/kang2018.h5ad"), exclude_labels=(), batch_key="sample_id",
                         labelled=("level_1=0.01",)),
}
LABEL_OPTIONS = ("labelled", "hide_labels", "novel_classes", "markers")
QUERIES = {  # reference-to-query: labels on the reference cells, the query annotated by the trained model
    "query_pbmc_mudan": dict(base=PBMC, column="source_dataset", query=("MUDAN",)),
    "query_kang_2donors": dict(base=dict(PBMC, data=str(ROOT / "data/kang2018.h5ad"), exclude_labels=()),
                               column="sample_id", query=None),  # the last two donors (sorted)
}


def truth_paths(adata, hierarchy):
    return hierarchy.level_labels(adata.obs[hierarchy.label_column].astype(str).to_numpy())


def scores(truth, predicted, levels, hierarchy):
    """Per-level ARI / accuracy / macro F1, hierarchical F1 and consistency of named predictions."""
    row = {}
    for i, level in enumerate(levels):
        t, p = truth[:, i], np.asarray(predicted[:, i], dtype=str)
        row[f"ari_{i + 1}"] = adjusted_rand_score(t, p)
        row[f"accuracy_{i + 1}"] = accuracy_score(t, p)
        row[f"macro_f1_{i + 1}"] = f1_score(t, p, labels=sorted(set(t)), average="macro", zero_division=0)
    row["hierarchical_f1"] = hierarchical_f1(truth, predicted)
    paths = {tuple(p) for p in hierarchy.paths.values()}
    row["consistency"] = float(np.mean([tuple(p) in paths or "unassigned" in p for p in predicted]))
    return row


def score_run(folder, hierarchy):
    adata = anndata.read_h5ad(Path(folder) / "outputs.h5ad")
    unlabelled = ~adata.obs["labelled"].to_numpy(bool)
    known = np.isin(adata.obs[hierarchy.label_column].astype(str), list(hierarchy.paths))
    cells = unlabelled & known
    truth = truth_paths(adata[cells], hierarchy)
    predicted = np.stack([adata.obs[f"scvae_{level}"].astype(str).to_numpy()[cells] for level in hierarchy.levels], 1)
    row = scores(truth, predicted, hierarchy.levels, hierarchy)
    row["n_scored"] = int(cells.sum())
    row["n_labelled"] = int((~unlabelled).sum())
    return row, adata


def baseline_row(adata, latent, hierarchy, labels):
    """Logistic regression on an unsupervised latent, fitted on the cells labelled at the finest
    revealed level, mapped up; levels below that level are not scored (NaN)."""
    finest = max(i for i in range(len(hierarchy.levels)) if (labels.iloc[:, i] != "").any())
    train_rows = (labels.iloc[:, finest] != "").to_numpy()
    unlabelled = (labels == "").all(axis=1).to_numpy()
    classifier = LogisticRegression(max_iter=2000).fit(latent[train_rows], labels.iloc[:, finest][train_rows])
    guess = classifier.predict(latent[unlabelled])
    up = {path[finest]: path for path in hierarchy.paths.values()}
    predicted = np.array([up[g][:finest + 1] for g in guess], dtype=object)
    truth = truth_paths(adata[unlabelled], hierarchy)[:, :finest + 1]
    row = scores(truth, predicted, hierarchy.levels[:finest + 1], hierarchy) if finest == len(hierarchy.levels) - 1 \
        else {f"ari_{i + 1}": adjusted_rand_score(truth[:, i], predicted[:, i]) for i in range(finest + 1)}
    return row


def done_keys():
    if not RESULTS.exists():
        return set()
    table = pd.read_csv(RESULTS)
    return set(zip(table["setting"], table["method"], table["seed"]))


def append(row):
    new = not RESULTS.exists()
    columns = ["setting", "method", "seed", "n_scored", "n_labelled"] + \
        [f"{m}_{i}" for m in ("ari", "accuracy", "macro_f1") for i in range(1, 5)] + \
        ["hierarchical_f1", "consistency", "novel_unassigned", "seconds"]
    with open(RESULTS, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def trained(name, options):
    folder = RUNS / name
    if not (folder / "metrics.json").exists():
        resume = (folder / "config.json").exists()
        train(TrainOptions(**options, output=str(folder), resume=resume, overwrite=not resume))
    return folder


# The other semi-supervised models on the same settings (method name in results.csv, options), with
# XLA: they decode every cluster per cell, where XLA halves the time of a step (README, Benchmark);
# and TreeVAE with the rule before 2026-12-02's change, side by side: labels switched the graph
# placement off, so compactness placed the leaves the labels leave free.
OTHER_MODELS = {"mixture": ("mixturevae", dict(model="mixture", xla=True)),
                "indmom": ("indmomvae", dict(model="indmom", xla=True)),
                "momix": ("momixvae", dict(model="momix", xla=True)),
                "tree_compact": ("treevae_compact", dict(model="tree", leaf_placement="compact"))}


def run_other_model(name, seed, model, done):
    """One semi-supervised run of another model (or TreeVAE variant) on a setting; no LR row (the
    setting's TreeVAE run has it, on the same labelled cells)."""
    method, extra = OTHER_MODELS[model]
    options = dict(PBMC, **SETTINGS[name], seed=seed, **extra)
    folder = trained(f"{name}_{model}_s{seed}", options)
    metrics = json.loads((folder / "metrics.json").read_text())
    hierarchy = Hierarchy.from_anndata(anndata.read_h5ad(options["data"], backed="r"))
    row, _ = score_run(folder, hierarchy)
    append(dict(row, setting=name, method=method, seed=seed, seconds=metrics["seconds"]))


def has_baseline(name):
    """Settings with an LR row: not the unknown type (other cells) nor markers (the same masks as without)."""
    return name != "unknown_cd14" and "markers" not in SETTINGS[name]


def setting_labels(name, seed):
    """The labels a setting's run of this seed is given: its labels.csv, or, where the run folder
    is gone, rebuilt by training's own code path (no training)."""
    saved = RUNS / f"{name}_s{seed}" / "labels.csv"
    if saved.exists():
        return pd.read_csv(saved, index_col="cell", keep_default_na=False)
    options = TrainOptions(**dict(PBMC, **SETTINGS[name], seed=seed))
    adata = read_counts(options.data)
    return labels_table(prepare_cells(adata, options, resolve_hierarchy(adata, options)))


def unsupervised_run(name, seed):
    """The setting's TreeVAE trained without labels (one per data file and seed): the LR baseline's
    latent and the `treevae_unsupervised` rows."""
    options = {k: v for k, v in dict(PBMC, **SETTINGS[name], seed=seed).items() if k not in LABEL_OPTIONS}
    stem = Path(options["data"]).stem  # PBMC's runs keep their first name
    genes = "" if options["n_genes"] == PBMC["n_genes"] else f"_{options['n_genes']}genes"
    return trained(f"unsupervised{'' if stem == 'pbmc' else '_' + stem}{genes}_s{seed}", options), options


def baseline_rows(name, seed, done):
    """The rows of the same TreeVAE trained without labels, on the setting's labelled cells: "lr"
    (logistic regression on its latent, fitted on them) and "treevae_unsupervised" (its own clusters
    on the never-labelled cells, what "no worse than the unsupervised model" compares with; ARI
    only, an unsupervised cluster has no class name of its own)."""
    folder, options = unsupervised_run(name, seed)
    adata = anndata.read_h5ad(folder / "outputs.h5ad")
    hierarchy = Hierarchy.from_anndata(anndata.read_h5ad(options["data"], backed="r"))
    labels = setting_labels(name, seed).loc[adata.obs_names]
    n_labelled = int((labels != "").any(axis=1).sum())
    if (name, "lr", seed) not in done:
        row = baseline_row(adata, adata.obsm["X_scvae"], hierarchy, labels)
        append(dict(row, setting=name, method="lr", seed=seed, n_labelled=n_labelled))
    if (name, "treevae_unsupervised", seed) not in done:
        cells = (labels == "").all(axis=1).to_numpy()
        truth = truth_paths(adata[cells], hierarchy)
        clusters = [adata.obs[f"scvae_{level}_cluster"].astype(str).to_numpy()[cells] for level in hierarchy.levels]
        row = {f"ari_{i + 1}": adjusted_rand_score(truth[:, i], c) for i, c in enumerate(clusters)}
        append(dict(row, setting=name, method="treevae_unsupervised", seed=seed, n_scored=int(cells.sum()),
                    n_labelled=n_labelled))


def setting_scores(folder, hierarchy, name):
    """score_run of a setting's TreeVAE run, plus (unknown_cd14) the share of the never-labelled
    type's cells called unassigned."""
    row, adata = score_run(folder, hierarchy)
    if name == "unknown_cd14":
        novel = adata.obs[hierarchy.label_column].astype(str).to_numpy() == "cd14_monocytes"
        row["novel_unassigned"] = float((adata.obs["scvae_level_4"].astype(str).to_numpy()[novel] == "unassigned").mean())
    return row, adata


def run_setting(name, seed):
    options = dict(PBMC, **SETTINGS[name], seed=seed)
    folder = trained(f"{name}_s{seed}", options)
    metrics = json.loads((folder / "metrics.json").read_text())
    hierarchy = Hierarchy.from_anndata(anndata.read_h5ad(options["data"], backed="r"))
    row, _ = setting_scores(folder, hierarchy, name)
    append(dict(row, setting=name, method="treevae", seed=seed, seconds=metrics["seconds"]))


def query_model_options(base):
    """The TreeVAE options of a query setting's base (what run.py's dicts hold besides the data,
    the model, the training length and what query_split applies itself)."""
    return {k: v for k, v in base.items()
            if k not in ("data", "model", "batch_key", "xla", "epochs", "patience", "exclude_labels")}


def reference_genes(reference, base, hierarchy):
    """The genes TreeVAE chooses on the reference cells (seurat_v3, `prepare_cells`), as a list."""
    return [str(g) for g in prepare_cells(reference, TrainOptions(n_genes=base["n_genes"]), hierarchy).adata.var_names]


def query_split(name):
    """(spec, model options, reference cells, query cells, hierarchy, query group names) of a
    reference-to-query setting."""
    spec = QUERIES[name]
    options = query_model_options(spec["base"])
    adata = anndata.read_h5ad(spec["base"]["data"])
    if spec["base"].get("exclude_labels"):
        adata = adata[~adata.obs["source_library"].isin(spec["base"]["exclude_labels"])].copy()
    groups = sorted(adata.obs[spec["column"]].astype(str).unique())
    query = list(spec["query"] or groups[-2:])
    is_query = adata.obs[spec["column"]].astype(str).isin(query).to_numpy()
    return spec, options, adata[~is_query].copy(), adata[is_query].copy(), Hierarchy.from_anndata(adata), query


def run_query(name, seed, done):
    """Train on the reference cells with all their labels (API), annotate the query (no batch
    covariate: the query's batches are new to the model)."""
    import scvae_hier as sh

    spec, options, reference, target, hierarchy, query = query_split(name)
    sh.TreeVAE.setup_anndata(reference, hierarchy=hierarchy)
    model = sh.TreeVAE(reference, semi_supervised=True, seed=seed, xla=False, **options)
    model.train(max_epochs=spec["base"]["epochs"], patience=spec["base"]["patience"], progress_bar=False)
    table = model.predict_levels(target, prefix="")
    predicted = table[hierarchy.levels].astype(str).to_numpy()
    truth = truth_paths(target, hierarchy)
    row = scores(truth, predicted, hierarchy.levels, hierarchy)
    append(dict(row, setting=f"{name} ({'+'.join(query)})", method="treevae", seed=seed, n_scored=target.n_obs,
                n_labelled=reference.n_obs))
    latent = model.get_latent_representation(reference)
    classifier = LogisticRegression(max_iter=2000).fit(latent, truth_paths(reference, hierarchy)[:, -1])
    guess = classifier.predict(model.get_latent_representation(target))
    up = {path[-1]: path for path in hierarchy.paths.values()}
    row = scores(truth, np.array([up[g] for g in guess], dtype=object), hierarchy.levels, hierarchy)
    append(dict(row, setting=f"{name} ({'+'.join(query)})", method="lr_same_latent", seed=seed,
                n_scored=target.n_obs, n_labelled=reference.n_obs))


def write_query_inputs(path=HERE / "query_inputs.json"):
    """What scanvi_query.py needs to run scANVI on the same reference and query cells with the same
    genes as `run_query` (it runs in another virtual environment, without this package): per
    setting the data file, excluded labels, the query column and groups, and the genes TreeVAE
    chooses on the reference cells (seurat_v3, `prepare_cells`)."""
    inputs = {}
    for name in QUERIES:
        spec, options, reference, _, hierarchy, query = query_split(name)
        inputs[f"{name} ({'+'.join(query)})"] = dict(
            data=str(Path(spec["base"]["data"]).relative_to(ROOT)), exclude_labels=list(spec["base"].get("exclude_labels", ())),
            column=spec["column"], query=query, genes=reference_genes(reference, spec["base"], hierarchy))
    path.write_text(json.dumps(inputs, indent=1) + "\n")
    print(f"wrote {path}: " + ", ".join(f"{k} ({len(v['genes'])} genes)" for k, v in inputs.items()))


def query_elbo(model, query, batch=None, draws=5):
    """Mean ELBO per query cell (5 noise draws), reading every cell as `batch` if given."""
    import tensorflow as tf

    X, covariates, _ = model._model_cells(query, batch)
    x = tf.constant(X.toarray() if hasattr(X, "toarray") else X, tf.float32)
    return float(np.mean([tf.reduce_mean(model.module.terms(x, covariates=tf.constant(covariates))["elbo"])
                          for _ in range(draws)]))


def run_query_batches(name, seed, done, epochs=50):
    """The reference trained with its batches as a covariate (`column`); the query's batches are
    new to it, so they are read as the reference's largest batch (`--batch`), or fitted with the
    rest frozen (`--fit-new-batches`, 50 epochs). Query ELBOs go to query_batches.txt."""
    import scvae_hier as sh

    spec, options, reference, target, hierarchy, query = query_split(name)
    folder = RUNS / f"{name}_batches_s{seed}"
    if (folder / "model.keras").exists():
        model = sh.TreeVAE.load(folder)
    else:
        sh.TreeVAE.setup_anndata(reference, hierarchy=hierarchy, batch_key=spec["column"])
        model = sh.TreeVAE(reference, semi_supervised=True, seed=seed, xla=False, **options)
        model.train(max_epochs=spec["base"]["epochs"], patience=spec["base"]["patience"], progress_bar=False)
        model.save(folder, overwrite=True)
    largest = reference.obs[spec["column"]].astype(str).value_counts().index[0]
    setting = f"{name} ({'+'.join(query)})"
    truth = truth_paths(target, hierarchy)
    for method, read in ((f"treevae_batch_as_{largest}", lambda: (model, largest)),
                         ("treevae_batches_fitted", lambda: (model.fit_new_batches(target, max_epochs=epochs), None))):
        if (setting, method, seed) in done:
            continue
        start = time.time()
        reader, batch = read()
        table = reader.predict_levels(target, prefix="", batch=batch)
        row = scores(truth, table[hierarchy.levels].astype(str).to_numpy(), hierarchy.levels, hierarchy)
        append(dict(row, setting=setting, method=method, seed=seed, n_scored=target.n_obs,
                    n_labelled=reference.n_obs, seconds=time.time() - start))
        with open(HERE / "query_batches.txt", "a") as handle:
            handle.write(f"{setting} seed {seed} {method}: query ELBO {query_elbo(reader, target, batch):.2f}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--models", nargs="+", default=["tree"], choices=["tree", *OTHER_MODELS])
    parser.add_argument("--query-inputs", action="store_true",
                        help="only write query_inputs.json (cells and genes of the query settings, for scanvi_query.py)")
    args = parser.parse_args()
    if args.query_inputs:
        write_query_inputs()
        sys.exit()
    names = args.only or list(SETTINGS) + list(QUERIES)
    for seed in args.seeds:
        for name in names:
            done = done_keys()
            for model in (m for m in args.models if m != "tree"):
                if name in SETTINGS and name != "unknown_cd14" and (name, OTHER_MODELS[model][0], seed) not in done:
                    run_other_model(name, seed, model, done)
            if "tree" not in args.models:
                continue
            if name in QUERIES:
                if not any(s.startswith(name) and m == "treevae" and sd == seed for s, m, sd in done):
                    run_query(name, seed, done)
                run_query_batches(name, seed, done)
                continue
            if (name, "treevae", seed) not in done:
                run_setting(name, seed)
            if has_baseline(name) and {(name, m, seed) for m in ("lr", "treevae_unsupervised")} - done:
                baseline_rows(name, seed, done)
