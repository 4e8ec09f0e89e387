"""The final refit's EM steps (default 10), measured on trained runs and left as they are
(2026-12-04, NOTES.md): each run's final refit is redone with STEPS steps into OUT (same encoder,
`refit_run`), and ARI at levels 1-4 and the level-4 weighted F1 of the run as trained and of the
refit are printed on its validation and test cells. One JSON line per run (em_steps.jsonl).

    python analyses/tuning/tree/em_steps.py STEPS OUT RUN [RUN ...]
"""
import json
import sys
from pathlib import Path

import anndata

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from scvae_hier.metrics import clustering_scores  # noqa: E402
from scvae_hier.refit import refit_run  # noqa: E402


def scores(run):
    """ARI L1-L4 and L4 weighted F1 (Hungarian) of a run's own clusters, per split."""
    a = anndata.read_h5ad(Path(run) / "outputs.h5ad")
    out = {}
    for part in ("validation", "test"):
        m = (a.obs.split == part).to_numpy()
        found = [clustering_scores(a.obs[f"level_{l}"].astype(str)[m].to_numpy(),
                                   a.obs[f"scvae_level_{l}_cluster"].astype(str)[m].to_numpy()) for l in (1, 2, 3, 4)]
        out[part] = [round(f["ari"], 4) for f in found] + [round(found[-1]["f1_weighted"], 4)]
    return out


steps, out_dir, runs = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
for run in runs:
    target = out_dir / f"{Path(run).parent.name}_{Path(run).name}_em{steps}"
    if not (target / "outputs.h5ad").exists():
        refit_run(run, target, log=lambda *_: None, overwrite=True, final_refit=steps)
    print(json.dumps({"run": run, "steps": steps, "as_run": scores(run), "refit": scores(target)}), flush=True)
