"""Validation queries for label transfer (issue 16): TreeVAE's posterior against logistic regression on
its own latent as the read-out of a fully labelled reference, on splits that hold no cell of run.py's
test queries (PBMC: fastTopics labelled, scMINER annotated; Kang: donors 101, 107, 1015, 1039
labelled, 1016 + 1244 annotated). run.py's query options; one line per read-out to
readout_validation.jsonl.

    python analyses/partial_labels/readout_validation.py pbmc_val|kang_val SEED [OPTION=VALUE ...]
    python analyses/partial_labels/readout_validation.py --query-inputs   # the splits, for scanvi_query.py

OPTION=VALUE: TreeVAE options on top of run.py's (e.g. label_weight=50), recorded in each line.
"""
import json
import os
import sys
import time
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import anndata  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import run  # noqa: E402
import scvae_hier as sh  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402

SPLITS = {"pbmc_val": (run.PBMC, "source_dataset", ["fastTopics"], ["scMINER"]),
          "kang_val": (dict(run.PBMC, data=str(run.ROOT / "data/kang2018.h5ad"), exclude_labels=()), "sample_id",
                       ["101", "107", "1015", "1039"], ["1016", "1244"])}
if sys.argv[1] == "--query-inputs":  # add the validation splits to query_inputs.json, for scanvi_query.py
    path = run.HERE / "query_inputs.json"
    inputs = json.loads(path.read_text())
    for name, (base, column, ref_groups, query_groups) in SPLITS.items():
        adata = anndata.read_h5ad(base["data"])
        adata = adata[~adata.obs["source_library"].isin(base["exclude_labels"])] if base["exclude_labels"] else adata
        reference = adata[adata.obs[column].astype(str).isin(ref_groups).to_numpy()].copy()
        inputs[name] = dict(data=str(Path(base["data"]).relative_to(run.ROOT)), exclude_labels=list(base["exclude_labels"]),
                            column=column, reference=ref_groups, query=query_groups,
                            genes=run.reference_genes(reference, base, Hierarchy.from_anndata(adata)))
    path.write_text(json.dumps(inputs, indent=1) + "\n")
    sys.exit()
name, seed = sys.argv[1], int(sys.argv[2])
changes = {key: json.loads(value) for key, value in (arg.split("=", 1) for arg in sys.argv[3:])}
base, column, ref_groups, query_groups = SPLITS[name]
adata = anndata.read_h5ad(base["data"])
if base.get("exclude_labels"):
    adata = adata[~adata.obs["source_library"].isin(base["exclude_labels"])].copy()
hierarchy = Hierarchy.from_anndata(adata)
group = adata.obs[column].astype(str)
reference, target = adata[group.isin(ref_groups).to_numpy()].copy(), adata[group.isin(query_groups).to_numpy()].copy()
options = dict(run.query_model_options(base), **changes)
sh.TreeVAE.setup_anndata(reference, hierarchy=hierarchy)
model = sh.TreeVAE(reference, semi_supervised=True, seed=seed, xla=False, **options)
t = time.time()
model.train(max_epochs=base["epochs"], patience=base["patience"], progress_bar=False)
seconds = time.time() - t
truth = run.truth_paths(target, hierarchy)
up = {path[-1]: path for path in hierarchy.paths.values()}
out = {}
table = model.predict_levels(target, prefix="")
out["posterior"] = table[hierarchy.levels].astype(str).to_numpy()
latent_ref, latent_q = model.get_latent_representation(reference), model.get_latent_representation(target)
leaf = run.truth_paths(reference, hierarchy)[:, -1]
for tag, clf in (("lr", LogisticRegression(max_iter=2000)),
                 ("lr_scaled", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)))):
    guess = clf.fit(latent_ref, leaf).predict(latent_q)
    out[tag] = np.array([up[g] for g in guess], dtype=object)
for tag, predicted in out.items():
    row = run.scores(truth, predicted, hierarchy.levels, hierarchy)
    line = dict(split=name, seed=seed, readout=tag, options=changes, epochs=base["epochs"], n_ref=reference.n_obs,
                n_query=target.n_obs, train_seconds=round(seconds),
                **{k: round(v, 4) for k, v in row.items()})
    print(json.dumps(line), flush=True)
    with open(run.HERE / "readout_validation.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
