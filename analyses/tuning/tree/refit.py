"""Offline check of a final prior refit on finished TreeVAE runs (no training): load the run's
model, take q(z|x) of its training cells, re-seed the components from a tree-shaped k-means of
the latent means and run EM steps on the prior terms (`TreeVAE.refit_prior`), then score the
validation cells' nested predictions as score.py does. Writes nothing into the run.

    python analyses/tuning/tree/refit.py RUN [RUN ...]
"""
import os
import sys

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

import scvae_hier.models.tree  # noqa: E402,F401  (registers TreeVAE)
from scvae_hier.data import batch_covariates  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402
from scvae_hier.models.supervision import path_predictions  # noqa: E402

from scvae_hier.models.tree import TreeVAE  # noqa: E402

# The first runs of this tuning saved reseed_epoch (one epoch) before it became reseed_epochs.
TreeVAE.from_config = classmethod(lambda cls, config: cls(**{
    ("reseed_epochs" if k == "reseed_epoch" else k): ([v] if k == "reseed_epoch" else v) for k, v in config.items()}))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import hungarian_f1  # noqa: E402


def encode(model, X, covariates, batch=1024):
    locs, scales = [], []
    for start in range(0, X.shape[0], batch):
        x = X[start:start + batch]
        x = tf.constant(x.toarray() if hasattr(x, "toarray") else np.asarray(x), tf.float32)
        c = None if covariates is None else tf.constant(covariates[start:start + batch])
        _, loc, scale = model.encode(x, covariates=c)
        locs.append(loc.numpy())
        scales.append(scale.numpy())
    return np.concatenate(locs), np.concatenate(scales)


def evaluate(model, loc, scale, truth, parents):
    log_qc = model.component_log_posterior(tf.constant(loc), tf.constant(scale), tf.constant(loc))
    probabilities = [np.exp(m.numpy()) for m in model.level_log_marginals(log_qc)]
    nested = path_predictions(probabilities, parents)
    aris = [adjusted_rand_score(truth[:, l], nested[l]) for l in range(truth.shape[1])]
    return aris, hungarian_f1(truth[:, -1], nested[-1])["weighted"]


def scores_by_part(model, loc, scale, split, truth, digits=3):
    """{"validation": [...], "test": [...]}: ARI per level and level-4 weighted F1, rounded."""
    row = {}
    for part in ("validation", "test"):
        cells = split == part
        aris, f1 = evaluate(model, loc[cells], scale[cells], truth[cells], model.parents)
        row[part] = [round(float(a), digits) for a in aris] + [round(float(f1), digits)]
    return row


def runs_to_score(out, field, keys, folders):
    """(folder, name, key, (loc, scale, split, truth)) for every run and key (a rule, a variant) not
    yet in the JSON lines of `out` (column `field`); each run is loaded once, and only if needed, so
    an interrupted measurement resumes where it stopped."""
    out = Path(out)
    done = {(r["run"], r[field]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    for folder in map(Path, folders):
        name = f"{folder.parent.name}/{folder.name}"
        todo = [key for key in keys if (name, key) not in done]
        if todo:
            _, loc, scale, split, truth = load_run(folder)
            for key in todo:
                yield folder, name, key, (loc, scale, split, truth)


def append_row(out, row):
    """One JSON line to `out`, written at once (a measurement keeps what it has), and printed."""
    with open(out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(row, flush=True)


def load_run(folder):
    """A finished run's model, q(z|x) means and scales of all its cells, their split and level codes."""
    config = json.loads((folder / "config.json").read_text())
    hierarchy = Hierarchy.from_dict(config["hierarchy"])
    model = keras.saving.load_model(folder / "model.keras")
    cells = anndata.read_h5ad(folder / "outputs.h5ad")
    covariates = None
    if config["options"].get("batch_key"):
        covariates, _ = batch_covariates(cells.obs, config["options"]["batch_key"], model.covariates)
    truth = hierarchy.level_codes(cells.obs[hierarchy.label_column].astype(str).to_numpy())
    loc, scale = encode(model, cells.X, covariates)
    return model, loc, scale, cells.obs["split"].to_numpy(), truth


if __name__ == "__main__":
    for path in sys.argv[1:]:
        folder = Path(path)
        model, loc, scale, split, truth = load_run(folder)
        train, validation = split == "train", split == "validation"
        before = evaluate(model, loc[validation], scale[validation], truth[validation], model.parents)
        results = {"as trained": before}
        variants = [(10, True, 1, None), (10, True, 2, None), (10, True, 3, None), (10, False, 0, None),
                    (30, True, 2, "learnable"), (30, True, 3, "learnable"), (30, True, 4, "learnable")]
        for steps, reseed, clusters, weights in variants:
            fresh = keras.saving.load_model(folder / "model.keras")
            fresh.reseed_clusters = clusters or fresh.reseed_clusters
            fresh.prior_probabilities = weights or fresh.prior_probabilities  # learnable: EM also fits p(c)
            fresh.refit_prior(loc[train], scale[train], steps=steps, reseed=reseed)
            kl = fresh.kl_to_prior(tf.constant(loc[train][:, None]), tf.constant(scale[train][:, None]),
                                   tf.constant(loc[train][:, None]), fresh.components.distribution()).numpy()
            objective = float(np.mean(np.logaddexp.reduce(fresh.log_pc().numpy() - kl, axis=1)))
            aris, f1 = evaluate(fresh, loc[validation], scale[validation], truth[validation], model.parents)
            results[f"reseed={reseed} k/leaf={clusters} em={steps} p(c)={weights or 'as run'} prior terms {objective:.3f}"] = (aris, f1)
        for name, (aris, f1) in results.items():
            print(f"{folder.name:<18} {name:<68} ARI {' / '.join(f'{a:.2f}' for a in aris)}  wF1 {f1:.2f}", flush=True)
