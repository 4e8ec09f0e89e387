"""The tutorial notebook runs, top to bottom, on a small subset of the shipped cells: its own
asserts check each step (latent in obsm, named predictions in obs, save/load identical, genes
aligned by name, missing genes refused, 100 cells sampled from a node, a semi-supervised
reference naming a query of a new batch on paths of the tree), so it cannot rot."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"
DATA = Path(__file__).resolve().parents[1] / "data" / "pbmc.h5ad"


def test_tutorial_notebook_runs_end_to_end(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no reliance on the working directory
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    namespace = {}
    exec("".join(code[0]["source"]), namespace)
    namespace.update(DATA=str(DATA), N_CELLS=400, EPOCHS=3)  # the test's parameters
    for cell in code[1:]:
        exec(compile("".join(cell["source"]), f"tutorial cell {cell['id']}", "exec"), namespace)
    adata = namespace["adata"]
    assert adata.n_obs == 400 and "X_umap" in adata.obsm
    assert namespace["generated"].n_obs == 100
    query = namespace["query"]
    assert set(query.obs["source_dataset"]) == {"MUDAN"} and len(namespace["with_own_batch"]) == query.n_obs
    assert namespace["fitted"].module.covariates[-1] == "MUDAN"

    # sh.pl draws what it says: per level a true and a predicted panel with every cell.
    sh = namespace["sh"]
    figure = sh.pl.levels(adata, basis="umap")
    levels = ["level_1", "level_2", "level_3", "level_4"]
    assert [ax.get_title().split(":")[0] for ax in figure.axes] == levels + levels
    assert all(ax.collections[0].get_offsets().shape[0] == 400 for ax in figure.axes)
    assert "agree" in figure.axes[4].get_title()
    matrix = sh.pl.hierarchy_matrix(adata, basis="umap", save=tmp_path / "matrix.png")
    assert matrix.is_file()
