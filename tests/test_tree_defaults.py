"""TreeVAE's defaults are the configuration chosen on validation cells (analyses/tuning/tree/NOTES.md,
`k2l`): learnable p(c), re-seeding at epoch 5 and a 10-step final refit, both with 4 clusters per
leaf without labels (NOTES.md, refit_rules.py) and 2 with them (the partial-label results' setting), in
the constructor and on the command line alike; the other models keep a uniform p(y)."""
import pytest

from scvae_hier.cli import build_parser
from scvae_hier.models import TreeVAE
from scvae_hier.options import TrainOptions


def test_constructor_defaults_are_the_tuned_configuration():
    model = TreeVAE(7, level_sizes=(2, 3), parents=[[0, 0, 1]])
    assert (model.prior_probabilities, model.reseed_epochs, model.reseed_clusters, model.final_refit,
            model.final_refit_clusters) == ("learnable", (5,), 4, 10, 4)
    # With labels both re-seeds use 2 pieces (the partial-label results' setting) ...
    labelled = TreeVAE(7, level_sizes=(2, 3), parents=[[0, 0, 1]], semi_supervised=True)
    assert (labelled.reseed_clusters, labelled.final_refit_clusters) == (2, 2)
    # ... and the final refit follows an explicit re-seed count there.
    assert TreeVAE(7, level_sizes=(2, 3), parents=[[0, 0, 1]], semi_supervised=True,
                   reseed_clusters=3).final_refit_clusters == 3
    assert TreeVAE(7, level_sizes=(2, 3), parents=[[0, 0, 1]], reseed_clusters=3).final_refit_clusters == 4
    assert TreeVAE(7, level_sizes=(2, 3), parents=[[0, 0, 1]], final_refit_clusters=3).final_refit_clusters == 3


@pytest.mark.parametrize("argv, expected", [
    (["--model", "tree"], "learnable"),
    (["--model", "tree", "--prior-probabilities", "uniform"], "uniform"),   # an explicit choice stays
    (["--model", "mixture"], "uniform"),
    (["--model", "momix"], "uniform"),
])
def test_command_line_prior_probabilities_follow_the_model(argv, expected):
    arguments = vars(build_parser().parse_args(["train", "data.h5ad", *argv]))
    options = TrainOptions.from_dict(arguments)
    assert options.prior_probabilities == expected
    assert (options.reseed_epochs, options.reseed_clusters, options.final_refit, options.final_refit_clusters) == (
        (5,), None, 10, None)   # None: the model decides (4 without labels, 2 with them)


def test_final_refit_clusters_from_the_command_line_reach_the_model():
    arguments = vars(build_parser().parse_args(["train", "data.h5ad", "--model", "tree", "--final-refit-clusters", "3"]))
    options = TrainOptions.from_dict(arguments)
    assert options.final_refit_clusters == 3
    assert TreeVAE.arguments_from(options, _tree())["final_refit_clusters"] == 3


@pytest.mark.parametrize("argv, expected", [([], True), (["--no-encode-covariates"], False)])
def test_encode_covariates_from_the_command_line_reach_the_model(argv, expected):
    from scvae_hier.training import model_arguments
    arguments = vars(build_parser().parse_args(["train", "data.h5ad", "--model", "tree", "--batch-key", "b", *argv]))
    options = TrainOptions.from_dict(arguments)
    assert model_arguments(options, 5, _tree(), covariates=["p", "q"])["encode_covariates"] is expected


@pytest.mark.parametrize("argv, expected", [([], "linkage"), (["--top-level-split", "compact"], "compact")])
def test_top_level_split_from_the_command_line_reaches_the_saved_model(argv, expected):
    arguments = vars(build_parser().parse_args(["train", "data.h5ad", "--model", "tree", *argv]))
    model = TreeVAE(7, level_sizes=(2, 3), **{key: value for key, value in TreeVAE.arguments_from(
        TrainOptions.from_dict(arguments), _tree()).items() if key in ("parents", "top_level_split")})
    assert model.top_level_split == expected and model.get_config()["top_level_split"] == expected
    # a model file from before the option has no such key: it loads with the default
    config = model.get_config()
    del config["top_level_split"]
    assert TreeVAE.from_config(config).top_level_split == "linkage"


def _tree():
    from scvae_hier.hierarchy import Hierarchy
    return Hierarchy("label", ["a", "b"], {"x": ("A", "A1"), "y": ("A", "A2"), "z": ("B", "B1")})


def test_a_single_value_for_a_list_option_is_a_list_of_one():
    """Python API: `reseed_epochs=10` or `exclude_labels="cd14_monocytes"` mean a list of one, not a
    crash deep in the model or a string read as its characters."""
    options = TrainOptions(data="x.h5ad", model="tree", reseed_epochs=10, exclude_labels="cd14_monocytes", hidden=64)
    assert (options.reseed_epochs, options.exclude_labels, options.hidden) == ((10,), ("cd14_monocytes",), (64,))
    assert TreeVAE.arguments_from(options, _tree())["reseed_epochs"] == [10]
    with pytest.raises(ValueError, match="three fractions"):
        TrainOptions(data="x.h5ad", split=0.8)


def test_empty_leaves_from_the_command_line_reach_the_model():
    arguments = vars(build_parser().parse_args(["train", "data.h5ad", "--model", "tree", "--empty-leaves", "B1", "A2"]))
    options = TrainOptions.from_dict(arguments)
    assert tuple(options.empty_leaves) == ("B1", "A2")
    assert sorted(TreeVAE.arguments_from(options, _tree())["empty_leaves"]) == [1, 2]
    with pytest.raises(ValueError, match="--empty-leaves is a TreeVAE option"):
        TrainOptions.from_dict({**arguments, "model": "mixture"})


def test_a_run_with_an_empty_leaf_puts_no_cell_there(pbmc_slice, tmp_path):
    """End to end on real cells: the run's clusters never use the named leaf, and the run remembers it."""
    import json

    import anndata

    from scvae_hier.cli import main
    from scvae_hier.hierarchy import Hierarchy
    from conftest import FAST
    run = tmp_path / "run"
    assert main(["train", str(pbmc_slice), "--model", "tree", *FAST, "--epochs", "2", "--output", str(run),
                 "--empty-leaves", "CD34+"]) == 0
    config = json.loads((run / "config.json").read_text())
    leaves = list(Hierarchy.from_dict(config["hierarchy"]).classes(3))
    outputs = anndata.read_h5ad(run / "outputs.h5ad")
    used = set(outputs.obs["scvae_level_4_cluster"].astype(int))
    assert leaves.index("CD34+") not in used and len(used) >= 5
    assert config["options"]["empty_leaves"] == ["CD34+"]


def test_an_empty_leaf_with_labels_that_need_it_is_refused_by_name(pbmc_slice, tmp_path, capsys):
    """Labelled cells of the type whose leaf is to stay empty: refused before training, naming the
    label; level-1 labels leave the leaf free, so the same leaf empty then trains."""
    from scvae_hier.cli import main
    from conftest import FAST
    common = ["train", str(pbmc_slice), "--model", "tree", *FAST, "--epochs", "1", "--empty-leaves", "CD19+ B"]
    assert main([*common, "--labelled", "level_4=0.5", "--output", str(tmp_path / "fine")]) != 0
    assert "level_4=CD19+ B" in capsys.readouterr().err and not (tmp_path / "fine" / "model.keras").exists()
    assert main([*common, "--labelled", "level_1=0.5", "--output", str(tmp_path / "coarse"), "--reseed-epochs", "1"]) == 0
