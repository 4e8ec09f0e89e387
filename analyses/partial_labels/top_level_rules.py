"""The top level's rule on the unsupervised TreeVAEs behind the partial-label rows, paired on the same
trained encoders (`scvae-hier refit`): each run as trained, refitted with the top level by
compactness, and refitted with today's code (linkage with the fragment guard); scored like run.py's
`treevae_unsupervised` rows (cells never labelled in the setting's mask). Lines in
top_level_rules.jsonl (tree NOTES.md, "A fragment set apart by the linkage").

    python analyses/partial_labels/top_level_rules.py l1_1pct 0 1 2 ... 11
    python analyses/partial_labels/top_level_rules.py kang_l1_1pct 0 1 2 3 4 5
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as R  # noqa: E402  (sets one thread)
import anndata  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from scvae_hier.hierarchy import Hierarchy  # noqa: E402
from scvae_hier.refit import refit_run  # noqa: E402

OUT = HERE / "top_level_rules.jsonl"
REFITS = R.ROOT / "runs" / "partial_top_level"


def score(run, setting, seed, hierarchy, cols):
    adata = anndata.read_h5ad(run / "outputs.h5ad")
    cells = (R.setting_labels(setting, seed).loc[adata.obs_names] == "").all(axis=1).to_numpy()
    truth = R.truth_paths(adata[cells], hierarchy)
    return adata, [round(adjusted_rand_score(truth[:, i], adata.obs[c].astype(str).to_numpy()[cells]), 4)
                   for i, c in enumerate(cols)]


if __name__ == "__main__":
    setting, seeds = sys.argv[1], [int(s) for s in sys.argv[2:]]
    for seed in seeds:
        folder, options = R.unsupervised_run(setting, seed)
        hierarchy = Hierarchy.from_anndata(anndata.read_h5ad(options["data"], backed="r"))
        cols = [f"scvae_{level}_cluster" for level in hierarchy.levels]
        trained, aris = score(folder, setting, seed, hierarchy, cols)
        rows = [dict(rule="as trained", ari=aris)]
        for rule, changes in (("compact", dict(top_level_split="compact")), ("today's code", {})):
            target = REFITS / f"{folder.name}_{'compact' if changes else 'today'}"
            if not (target / "metrics.json").exists():
                refit_run(folder, target, overwrite=True, **changes)
            adata, aris = score(target, setting, seed, hierarchy, cols)
            same = bool((adata.obs[cols].astype(str).to_numpy() == trained.obs[cols].astype(str).to_numpy()).all())
            rows.append(dict(rule=rule, ari=aris, same_as_trained=same))
        with open(OUT, "a") as handle:
            for row in rows:
                row = dict(setting=setting, seed=seed, **row)
                print(row, flush=True)
                handle.write(json.dumps(row) + "\n")
