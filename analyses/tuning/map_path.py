"""Validation cells: per-level labels from each level's marginal argmax vs from the MAP path
argmax q(y_1..y_L|x) of a MoMixVAE run (ARI per level and hierarchy consistency for both).

    python analyses/tuning/map_path.py RUN [RUN ...]
"""
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.metrics import adjusted_rand_score as ari

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scvae_hier.metrics import hierarchy_consistency  # noqa: E402
from scvae_hier.data import batch_covariates  # noqa: E402
from scvae_hier.analysis.evaluate import load_cells  # noqa: E402
from scvae_hier.runs import RunDirectory, load_model  # noqa: E402

for path in sys.argv[1:]:
    run = RunDirectory(path)
    model = load_model(path)
    cells, hierarchy, _, _ = load_cells(run, subset="validation")
    config = run.read_config()
    key = config["options"].get("batch_key")
    cov = None
    if key:
        cov, _ = batch_covariates(cells.obs, key, categories=list(model.covariates))
    X = cells.X.toarray().astype("float32") if hasattr(cells.X, "toarray") else np.asarray(cells.X, "float32")
    h = model.encoder_input(tf.constant(X), None if cov is None else tf.constant(cov, tf.float32))
    log_q = model.log_q_paths(h).numpy()
    B = log_q.shape[0]
    flat = log_q.reshape(B, -1)
    best = np.unravel_index(flat.argmax(1), log_q.shape[1:])
    marg = []
    for l in range(log_q.ndim - 1):
        axes = tuple(a for a in range(1, log_q.ndim) if a != l + 1)
        marg.append(np.log(np.exp(log_q).sum(axis=axes)).argmax(1))
    labels = cells.obs[hierarchy.label_column].astype(str).to_numpy()
    truth = hierarchy.level_labels(labels)
    t = [truth[:, i] for i in range(truth.shape[1])]
    print(path.rstrip("/").split("/")[-1])
    print("  marginal ARI", [round(ari(t[i], marg[i]), 3) for i in range(len(marg))],
          "consistency", round(hierarchy_consistency(hierarchy, marg, t), 3))
    print("  MAP path ARI", [round(ari(t[i], best[i]), 3) for i in range(len(best))],
          "consistency", round(hierarchy_consistency(hierarchy, list(best), t), 3))
