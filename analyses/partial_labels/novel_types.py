"""Query cells of a type the reference lacked (issue 16): how many does TreeVAE call `unassigned`
with its novelty (`predict_levels(novelty_cutoff=...)`) against the posterior rule
(`unassigned_below`), and how many cells of known types are called so by mistake.

    python analyses/partial_labels/novel_types.py SPLIT SEED      # one line per split and seed to novel_types.jsonl

The reference is fully labelled (run.py's query options, no batch covariate) and never holds the
left-out type; the query holds it beside known types. Validation splits share no cell with the
test splits (the same rule as readout_validation.py): cutoffs are chosen on them. Query cells deeper
than the training cells are scored after thinning to their depth (`scvae_hier.novelty`); the
`_deep` validation split makes the query 2 times deeper than the training cells to check that.
novel_types_before_thinning.jsonl: the same splits scored without the thinning (the first version).
"""
import json
import os
import sys
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import anndata  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import run  # noqa: E402
import scvae_hier as sh  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402
from scvae_hier.novelty import thinned  # noqa: E402

KANG_VALIDATION, KANG_TEST = ["101", "107", "1015", "1039"], ["101", "107", "1015", "1016", "1039", "1244"]
SPLITS = {  # data, group column, label column, left-out type, reference groups, query groups
    "pbmc_val_cd14": ("pbmc", "source_dataset", "source_library", "cd14_monocytes", ["fastTopics"], ["scMINER"]),
    "kang_val_b": ("kang2018", "sample_id", "cluster_id", "B cells", KANG_VALIDATION, ["1016", "1244"]),
    "kang_val_fcgr3a": ("kang2018", "sample_id", "cluster_id", "FCGR3A+ Monocytes", KANG_VALIDATION, ["1016", "1244"]),
    # validation with a depth shift: the reference's reads thinned to 40% (seeded), the query as read
    "pbmc_val_cd14_deep": ("pbmc", "source_dataset", "source_library", "cd14_monocytes", ["fastTopics"], ["scMINER"]),
    "pbmc_test_cd14": ("pbmc", "source_dataset", "source_library", "cd14_monocytes", ["fastTopics", "scMINER"],
                       ["MUDAN"]),
    "kang_test_b": ("kang2018", "sample_id", "cluster_id", "B cells", KANG_TEST, ["1256", "1488"]),
    "kang_test_fcgr3a": ("kang2018", "sample_id", "cluster_id", "FCGR3A+ Monocytes", KANG_TEST, ["1256", "1488"]),
}
NOVELTY_CUTOFFS, POSTERIOR_CUTOFFS = (0.95, 0.99, 0.999), (0.5, 0.9)
REFERENCE_THINNING = 0.4


def main(split, seed):
    data, column, label, novel_type, reference_groups, query_groups = SPLITS[split]
    adata = anndata.read_h5ad(run.ROOT / "data" / f"{data}.h5ad")
    group, novel = adata.obs[column].astype(str), (adata.obs[label] == novel_type).to_numpy()
    reference = adata[group.isin(reference_groups).to_numpy() & ~novel].copy()
    if split.endswith("_deep"):
        reference.X = thinned(reference.X, REFERENCE_THINNING, seed=1)
    query = adata[group.isin(query_groups).to_numpy()].copy()
    options = run.query_model_options(run.PBMC)
    sh.TreeVAE.setup_anndata(reference, hierarchy=Hierarchy.from_anndata(adata[~novel]))
    model = sh.TreeVAE(reference, semi_supervised=True, seed=seed, xla=False, drop_empty_cells=True, **options)
    model.train(max_epochs=run.PBMC["epochs"], patience=run.PBMC["patience"], progress_bar=False)

    table = model.predict_levels(query, prefix="")
    is_novel = (query.obs[label] == novel_type).to_numpy()
    leaf_probability = table[f"{model.level_names[-1]}_probability"].to_numpy()
    line = dict(split=split, seed=seed, novel_type=novel_type, n_novel=int(is_novel.sum()), n_known=int((~is_novel).sum()),
                auc_novelty=roc_auc_score(is_novel, table["novelty"]),
                auc_posterior=roc_auc_score(is_novel, -leaf_probability),
                known_novelty_median=float(np.median(table["novelty"][~is_novel])),
                epochs=len(model.history), temperature=model.module.metadata.get("temperature"))
    for cutoff in NOVELTY_CUTOFFS:
        called = (model.predict_levels(query, prefix="", novelty_cutoff=cutoff)[model.level_names[-1]] == "unassigned")
        line[f"novelty_{cutoff}"] = [float(called[is_novel].mean()), float(called[~is_novel].mean())]
    for cutoff in POSTERIOR_CUTOFFS:
        called = (model.predict_levels(query, prefix="", unassigned_below=cutoff)[model.level_names[-1]] == "unassigned")
        line[f"posterior_{cutoff}"] = [float(called[is_novel].mean()), float(called[~is_novel].mean())]
    print(json.dumps(line), flush=True)
    with open(run.HERE / "novel_types.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
