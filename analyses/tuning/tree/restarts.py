"""Restarts: does training several TreeVAEs on the same cells and keeping one cut the fold spread?

    python analyses/tuning/tree/restarts.py train FOLD WEIGHT_SEED   # one run (one thread, resumable)
    python analyses/tuning/tree/restarts.py train FOLD WEIGHT_SEED pbmc   # the same on tree.yaml's PBMC cells
    python analyses/tuning/tree/restarts.py train FOLD WEIGHT_SEED kang reseed_clusters=4   # an option changed
    python analyses/tuning/tree/restarts.py train FOLD WEIGHT_SEED kang reseed_epochs=5,20   # a list option (10, for one)
    python analyses/tuning/tree/restarts.py train FOLD 0 pbmc "markers=CD8 T=CD8A,CD8B;CD34 HSC=PRSS57,SPINK2" reseed_markers=1
        # marker genes (";" between sets), used at the epoch re-seeds too (a tuning-only patch)
    python analyses/tuning/tree/restarts.py train FOLD 0 pbmc encode_covariates=0   # the batch to the decoder only (--no-encode-covariates)
    python analyses/tuning/tree/restarts.py report                   # score every finished run

Kang 2018 with the experiment's own settings (analyses/kang.yaml: TreeVAE, learnable p(c), the
same 5 folds of seed 0). The split stays that of seed 0, fold FOLD; WEIGHT_SEED changes only the
weights, noise and batch order (the package's `seed` sets both, so the split is pinned here).
Runs go to /work/tree_runs/restart_f<FOLD>_w<SEED> (not committed).

`report` chooses one run per fold by a score computed on the fold's VALIDATION cells without
their labels, and prints the chosen run's TEST-cell ARI beside the mean over its restarts:
- val_elbo: the validation ELBO at the best epoch (the score scikit-learn's n_init uses, as a
  likelihood);
- agreement: mean ARI of the run's finest-level clusters with the other restarts' on the
  validation cells (the consensus run: a stability criterion, label-free);
- latent_fit: ARI between the run's own finest clusters and k-means at K_L on its own latent, on
  validation cells (how well the mixture follows the latent it learned).
Lines are appended to restarts.jsonl.
"""
import dataclasses
import json
import os
import sys

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
RUNS = Path("/work/tree_runs")
SETTINGS = dict(data=str(ROOT / "data/kang2018.h5ad"), model="tree", prior="normal", prior_probabilities="learnable",
                usage_level_weights=(0.1, 0.1, 1.0, 1.0), n_genes=500, latent_dim=20, hidden=(100, 100),
                batch_size=128, learning_rate=0.001, epochs=100, patience=20, warm_up=5, xla=False,
                batch_key="sample_id", library_size="observed", dispersion="gene", folds=5)
# analyses/tree.yaml: the poster's nine populations of the shipped PBMC data
PBMC = dict(SETTINGS, data=str(ROOT / "data/pbmc.h5ad"), batch_key="source_dataset", exclude_labels=["cd14_monocytes"])


def train_one(fold, weight_seed, dataset="kang", *changes):
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from scvae_hier import training
    from scvae_hier.options import TrainOptions

    split_of = training.make_split
    training.make_split = lambda cells, options: split_of(cells, dataclasses.replace(options, seed=0))
    name = f"restart_f{fold}_w{weight_seed}" if dataset == "kang" else f"{dataset}_f{fold}_w{weight_seed}"
    changed = dict(change.split("=", 1) for change in changes)
    markers = tuple(changed.pop("markers").split(";")) if "markers" in changed else ()
    if changed.pop("reseed_markers", "0") == "1":  # tuning only: the epoch re-seeds place leaves by the markers too
        from scvae_hier.models.tree import TreeReseeding

        def on_epoch_begin(self, epoch, logs=None):
            if epoch in self.epochs:
                scores = self.marker_scores(self.model.markers) if self.model.markers else None
                self.assignments = self.model.reseed(*self.latent(), labels=self.labels, marker_scores=scores)
        TreeReseeding.on_epoch_begin = on_epoch_begin
        name += "_reseedmarkers"
    if "reseed_decay" in changed:  # tuning only: the epoch re-seeds group pieces coarse levels first too
        from scvae_hier.models.tree import TreeVAE
        decay, reseed = float(changed["reseed_decay"]), TreeVAE.reseed

        def reseed_coarse_first(self, *args, **kwargs):   # the epoch re-seeds pass no `clusters`
            if kwargs.get("clusters") is None:
                kwargs["grouping_decay"] = decay
            return reseed(self, *args, **kwargs)
        TreeVAE.reseed = reseed_coarse_first
    folder = RUNS / "_".join([name, *(f"{key}{value.strip(',').replace(',', '-')}" for key, value in changed.items()),
                              *(["markers"] if markers else [])])
    options = dict(SETTINGS if dataset == "kang" else PBMC, fold=fold, seed=weight_seed, output=str(folder),
                   **{key: tuple(int(v) for v in value.split(",") if v) if "," in value
                      else int(value) if value.lstrip("-").isdigit() else value
                      for key, value in changed.items() if key != "reseed_decay"}, markers=markers)
    if not (folder / "metrics.json").exists():
        if (folder / "config.json").exists():
            options["resume"] = True
        training.train(TrainOptions(**options))


def run_predictions(folder):
    """Validation and test cells' nested predictions, labels, latent and validation ELBO."""
    import anndata
    import pandas as pd
    from scvae_hier.hierarchy import Hierarchy
    from scvae_hier.models.tree import path_predictions

    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    hierarchy = Hierarchy.from_dict(config["hierarchy"])
    cells = anndata.read_h5ad(folder / "outputs.h5ad")
    probabilities = [cells.obsm[f"scvae_{level}_probabilities"] for level in hierarchy.levels]
    nested = path_predictions(probabilities, config["model_arguments"].get("parents"))
    history = pd.read_csv(folder / "history.csv")
    elbo = float(history.loc[history["epoch"] == metrics["best_epoch"], "val_elbo"].iloc[0])
    return dict(hierarchy=hierarchy, split=cells.obs["split"].to_numpy(), names=cells.obs_names.to_numpy(),
                labels=cells.obs[hierarchy.label_column].astype(str).to_numpy(), nested=nested,
                latent=np.asarray(cells.obsm["X_scvae"]), val_elbo=elbo)


def report():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    folds = {}
    for folder in sorted(RUNS.glob("restart_f?_w?")):
        if (folder / "metrics.json").exists():
            fold, seed = (int(part[1:]) for part in folder.name.split("_")[1:])
            folds.setdefault(fold, {})[seed] = run_predictions(folder)
    rows = []
    for fold, runs in sorted(folds.items()):
        seeds = sorted(runs)
        first = runs[seeds[0]]
        for run in runs.values():  # one split per fold, in the same cell order
            assert (run["names"] == first["names"]).all() and (run["split"] == first["split"]).all()
        validation, test = first["split"] == "validation", first["split"] == "test"
        truth = first["hierarchy"].level_labels(first["labels"])
        n_levels = truth.shape[1]
        for seed in seeds:
            run = runs[seed]
            finest = run["nested"][-1]
            others = [adjusted_rand_score(finest[validation], runs[s]["nested"][-1][validation])
                      for s in seeds if s != seed]
            k = first["hierarchy"].sizes[-1]
            kmeans = KMeans(k, n_init=10, random_state=0).fit_predict(run["latent"][validation])
            row = {"fold": fold, "seed": seed, "val_elbo": round(run["val_elbo"], 2),
                   "agreement": round(float(np.mean(others)), 4) if others else None,
                   "latent_fit": round(float(adjusted_rand_score(finest[validation], kmeans)), 4)}
            for level in range(n_levels):
                row[f"test_ari_{level + 1}"] = round(float(adjusted_rand_score(
                    truth[test, level], run["nested"][level][test])), 4)
                row[f"val_ari_{level + 1}"] = round(float(adjusted_rand_score(
                    truth[validation, level], run["nested"][level][validation])), 4)
            rows.append(row)
    with open(HERE / "restarts.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    n_levels = sum(1 for key in rows[0] if key.startswith("test_ari_"))
    aris = [f"test_ari_{level + 1}" for level in range(n_levels)]
    vals = [f"val_ari_{level + 1}" for level in range(n_levels)]
    print("fold seed  val_elbo  agreement  latent_fit  | test ARI L1..L4  | validation ARI L1..L4")
    for row in rows:
        print(f"{row['fold']:>4} {row['seed']:>4}  {row['val_elbo']:>8}  {row['agreement']}  {row['latent_fit']:>8}"
              f"  | {' / '.join(f'{row[a]:.2f}' for a in aris)}"
              f"  | {' / '.join(f'{row[a]:.2f}' for a in vals)}")
    by_fold = {}
    for row in rows:
        by_fold.setdefault(row["fold"], []).append(row)
    rules = {"mean over restarts": None, "seed 0 only (today)": lambda rs: next(r for r in rs if r["seed"] == 0),
             "best val_elbo": lambda rs: max(rs, key=lambda r: r["val_elbo"]),
             "most agreement": lambda rs: max(rs, key=lambda r: r["agreement"] or 0),
             "best latent_fit": lambda rs: max(rs, key=lambda r: r["latent_fit"]),
             "oracle (best test L2+L3+L4; not a rule)": lambda rs: max(rs, key=lambda r: sum(r[a] for a in aris[1:]))}
    print(f"\nTest-cell ARI L1..L{n_levels}, mean (min-max) over folds {sorted(by_fold)}:")
    for name, rule in rules.items():
        per_fold = []
        for rs in by_fold.values():
            if rule is None:
                per_fold.append([np.mean([r[a] for r in rs]) for a in aris])
            elif name.startswith("seed 0") and not any(r["seed"] == 0 for r in rs):
                continue
            else:
                chosen = rule(rs)
                per_fold.append([chosen[a] for a in aris])
        table = np.array(per_fold)
        print(f"  {name:<42} " + " / ".join(f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in
                                            zip(table.mean(0), table.min(0), table.max(0))))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_one(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
    else:
        report()
