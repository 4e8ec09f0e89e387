"""The issue-12 experiment's exact cells, genes, folds and hierarchy, for the scVI peer (scvi_leiden.py).

    .venv/bin/python analyses/scvi_peer/export_folds.py analyses/tree.yaml analyses/kang.yaml

scvi-tools lives in another virtual environment (it is not a dependency of scvae-hier), which
cannot run our TensorFlow code. So this script, in the package's environment, runs training's own
first steps (`prepare_cells`, `make_split`) for every fold of each experiment file and writes
`folds/<data name>/`: `cells.csv` (cell, label, batch, split of each fold), `genes.txt` (the
experiment's 500 genes) and `hierarchy.json`. Deterministic: the same folds as the experiment's runs.
"""
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent


def export(config_path):
    from scvae_hier.data import read_counts
    from scvae_hier.options import TrainOptions
    from scvae_hier.training import make_split, prepare_cells, resolve_hierarchy

    config = yaml.safe_load(Path(config_path).read_text())
    options = TrainOptions.from_dict({**config["options"], **config["models"][0], "data": config["data"],
                                      "folds": int(config["folds"]), "fold": 0, "seed": int(config.get("seed", 0))})
    adata = read_counts(options.data)
    hierarchy = resolve_hierarchy(adata, options)
    cells = prepare_cells(adata, options, hierarchy)
    table = pd.DataFrame({"label": cells.adata.obs[cells.hierarchy.label_column].astype(str).to_numpy(),
                          "batch": cells.adata.obs[options.batch_key].astype(str).to_numpy()},
                         index=cells.adata.obs_names)
    for fold in range(int(config["folds"])):
        table[f"fold_{fold}"] = make_split(cells, TrainOptions.from_dict({**options.to_dict(), "fold": fold}))
    folder = HERE / "folds" / Path(config["data"]).stem
    folder.mkdir(parents=True, exist_ok=True)
    table.rename_axis("cell").to_csv(folder / "cells.csv")
    (folder / "genes.txt").write_text("\n".join(cells.adata.var_names) + "\n")
    (folder / "hierarchy.json").write_text(json.dumps(cells.hierarchy.to_dict(), indent=1, default=str) + "\n")
    print(folder, table.shape, table["fold_0"].value_counts().to_dict())


if __name__ == "__main__":
    for path in sys.argv[1:]:
        export(path)
