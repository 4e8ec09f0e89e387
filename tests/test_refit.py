"""`scvae-hier refit`: a trained TreeVAE's final prior refit redone with other settings, checked
against training with those settings from the start (the same seed), and the experiment's use of
it for entries that share their training."""
import json

import anndata
import numpy as np
import pytest

from conftest import FAST

TRAIN = ["--model", "tree", *FAST, "--epochs", "3", "--reseed-epochs", "1", "--seed", "3"]
EMPTY = "CD14+ monocyte"


@pytest.fixture(scope="module")
def trained(pbmc_slice, tmp_path_factory):
    """The default run and the same training with the CD14+ monocytes' leaf left empty, both
    trained from the start (the empty leaf changes the final refit only)."""
    from scvae_hier.cli import main
    folder = tmp_path_factory.mktemp("refit")
    default, empty = folder / "default", folder / "empty"
    assert main(["train", str(pbmc_slice), *TRAIN, "--output", str(default)]) == 0
    assert main(["train", str(pbmc_slice), *TRAIN, "--output", str(empty), "--empty-leaves", EMPTY]) == 0
    return default, empty


def clusters(run):
    outputs = anndata.read_h5ad(run / "outputs.h5ad")
    columns = [c for c in outputs.obs.columns if c.startswith("scvae_level_") and c.endswith("_cluster")]
    probabilities = [outputs.obsm[k] for k in sorted(outputs.obsm) if k.endswith("_probabilities")]
    return outputs.obs[columns].astype(str).to_numpy(), probabilities, outputs.obsm["X_scvae"]


def test_a_refit_with_other_settings_writes_the_run_trained_with_them(trained, tmp_path, capsys):
    from scvae_hier.cli import main
    default, empty = trained
    refitted = tmp_path / "refitted"
    assert main(["refit", str(default), "--output", str(refitted), "--empty-leaves", EMPTY]) == 0
    printed = capsys.readouterr().out
    assert "ARI of clusters vs hierarchy levels (test cells)" in printed
    assert printed.count("Nearest other grouping of the leaves") == 1   # once, with the leaves' names
    got, want = clusters(refitted), clusters(empty)
    np.testing.assert_array_equal(got[0], want[0])                # every cell's cluster at every level
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)     # and its posterior
    np.testing.assert_array_equal(got[2], clusters(default)[2])   # the latent is the training's
    assert not np.array_equal(got[0], clusters(default)[0])       # the setting did change the clusters
    config, other = (json.loads((run / "config.json").read_text()) for run in (refitted, empty))
    assert config["refit_of"] == str(default)
    assert config["model_arguments"] == other["model_arguments"]
    assert {k: v for k, v in config["options"].items() if k != "output"} == {
        k: v for k, v in other["options"].items() if k != "output"}
    import scvae_hier
    model = scvae_hier.load_model(refitted)
    assert model.empty_leaves == other["model_arguments"]["empty_leaves"] and len(model.empty_leaves) == 1
    # the novelty reference is recorded again from the refitted prior (as the run trained with the setting)
    np.testing.assert_allclose(model.metadata["novelty_reference"]["quantiles"],
                               scvae_hier.load_model(empty).metadata["novelty_reference"]["quantiles"], rtol=1e-4)
    assert (model.metadata["novelty_reference"]["quantiles"]
            != scvae_hier.load_model(default).metadata["novelty_reference"]["quantiles"])
    assert (refitted / "history.csv").read_text() == (default / "history.csv").read_text()


def test_a_refit_with_the_runs_own_settings_gives_its_outputs_back(trained, tmp_path):
    from scvae_hier.refit import refit_run
    _, empty = trained
    again = refit_run(empty, tmp_path / "again", log=lambda *_: None)
    got, want = clusters(again), clusters(empty)
    np.testing.assert_array_equal(got[0], want[0])
    got, want = (json.loads((run / "metrics.json").read_text())["ari"] for run in (again, empty))
    assert got.keys() == want.keys() and all(got[s] == pytest.approx(want[s]) for s in want)


def test_a_run_reports_how_clearly_its_leaves_are_grouped(trained):
    """metrics.json holds the placement margin with the hierarchy's level names and the leaves'
    cluster names; the saved model keeps it (by leaf index), the two agree, and `analyse` puts its
    reading in report.md."""
    import scvae_hier
    from scvae_hier.hierarchy import Hierarchy
    default, _ = trained
    margin = json.loads((default / "metrics.json").read_text())["placement_margin"]
    model = scvae_hier.load_model(default)
    saved = model.metadata["placement_margin"]
    levels = Hierarchy.from_anndata(anndata.read_h5ad(default / "outputs.h5ad", backed="r")).levels
    assert margin["margin"] == saved["margin"] and isinstance(margin["margin"], float)
    assert list(margin["regrouped"]) == [levels[int(level)] for level in saved["regrouped"]]
    finest = model.metadata["cluster_names"][levels[-1]]
    for level, leaves in saved["regrouped"].items():
        assert margin["regrouped"][levels[int(level)]] == [finest[k] or f"cluster {k}" for k in leaves]
    assert margin["reading"].startswith("Nearest other grouping of the leaves (")
    from scvae_hier.cli import main
    assert main(["analyse", str(default), "--iwae-samples", "2"]) == 0
    assert f"Placement margin: {margin['reading']}" in (default / "report.md").read_text()


def test_a_refit_clears_the_runs_list_when_its_flag_comes_alone(trained, tmp_path):
    """`--empty-leaves` with no leaf: the run trained with an empty leaf, refitted with none, is the
    run trained without it."""
    from scvae_hier.cli import build_parser, main
    default, empty = trained
    arguments = build_parser().parse_args(["refit", str(empty), "--output", "x", "--empty-leaves", "--markers"])
    assert arguments.empty_leaves == [] and arguments.markers == []
    cleared = tmp_path / "cleared"
    assert main(["refit", str(empty), "--output", str(cleared), "--empty-leaves"]) == 0
    np.testing.assert_array_equal(clusters(cleared)[0], clusters(default)[0])
    assert json.loads((cleared / "config.json").read_text())["options"]["empty_leaves"] == []


def test_refit_refuses_what_it_cannot_do(trained, tmp_path):
    from scvae_hier.data import DataError
    from scvae_hier.refit import refit_options, refit_run
    default, empty = trained
    with pytest.raises(ValueError, match=r"\['epochs'\] change training"):
        refit_run(default, tmp_path / "x", epochs=5)
    with pytest.raises(ValueError, match="this run is --model mixture"):
        refit_options({"model": "mixture", "data": "x.h5ad"}, {})
    with pytest.raises(DataError, match=r"'NOTAGENE'\] are not among the 80 genes"):
        refit_run(default, tmp_path / "x", markers=("CD8 T=CD8A,NOTAGENE",))
    with pytest.raises(FileExistsError, match="holds a finished run"):
        refit_run(default, empty)
    with pytest.raises(FileExistsError, match="other than the source run"):
        refit_run(default, default)
    assert not (tmp_path / "x").exists()                          # a refused refit writes nothing


def test_the_experiment_shares_training_only_where_the_final_refit_alone_differs(tmp_path):
    from scvae_hier.analysis.experiment import planned_runs, read_config, shared_training
    config = tmp_path / "x.yaml"
    config.write_text("data: x.h5ad\nfolds: 2\nruns: runs\nresults: results\nmodels:\n"
                      "  - {model: tree}\n"
                      "  - {name: top, model: tree, top_level_split: compact}\n"
                      "  - {name: markers, model: tree, markers: ['CD8 T=CD8A']}\n"
                      "  - {name: placement, model: tree, leaf_placement: compact}\n"
                      "  - {name: placement top, model: tree, leaf_placement: compact, top_level_split: compact}\n"
                      "  - {model: mixture}\n")
    plan = planned_runs(read_config(config))
    sources = shared_training(plan)
    assert sources == {f"runs/{name}-f{fold}": f"runs/{source}-f{fold}" for fold in (0, 1)
                       for name, source in (("top", "tree-normal"), ("markers", "tree-normal"),
                                            ("placement_top", "placement"))}


def test_the_experiment_refits_an_entry_that_shares_its_training(pbmc_slice, tmp_path, capsys):
    """End to end, one fold: the second entry is not trained; its run is the first one's training
    with its own final refit, and the report holds both."""
    import yaml
    import pandas as pd
    from scvae_hier.cli import main
    config = tmp_path / "x.yaml"
    config.write_text(yaml.safe_dump({
        "data": str(pbmc_slice), "folds": 2, "seed": 0, "runs": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"), "iwae_samples": 5,
        "options": {"model": "tree", "n_genes": 80, "latent_dim": 4, "hidden": [16, 16], "batch_size": 64,
                    "epochs": 2, "warm_up": 1, "reseed_epochs": [1], "xla": False},
        "models": [{"model": "tree"}, {"name": "TreeVAE empty", "model": "tree", "empty_leaves": [EMPTY]}]}))
    assert main(["experiment", str(config), "--folds", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Training TreeVAE") == 1 and "the final refit redone" in printed
    first, second = tmp_path / "runs" / "tree-normal-f0", tmp_path / "runs" / "treevae_empty-f0"
    assert json.loads((second / "config.json").read_text())["refit_of"] == str(first)
    np.testing.assert_array_equal(clusters(second)[2], clusters(first)[2])
    assert not np.array_equal(clusters(second)[0], clusters(first)[0])
    groups = set(pd.read_csv(tmp_path / "results" / "summary.csv")["group"])
    assert {"TreeVAE Normal", "TreeVAE empty"} <= groups
