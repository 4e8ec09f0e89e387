"""label_grouping="named": a label-free tree clustering named by the labels. The least-conflict
naming against brute force over every leaf permutation that keeps the tree's groupings; on
clustered points, the names follow the labels, and labels the latent does not support leave the
grouping made with them."""
import itertools

import numpy as np
import pytest

from scvae_hier.cli import build_parser
from scvae_hier.models import TreeVAE
from scvae_hier.models.naming import least_conflict_naming, subtree_shapes, tree_children
from scvae_hier.models.supervision import leaf_ancestors
from scvae_hier.models.tree import NAMED_TOLERANCE, tree_clustering
from scvae_hier.options import REFIT_OPTIONS, TrainOptions

TREES = [([[0, 0, 1, 1]], 4),                                      # two classes of two leaves
         ([[0, 0, 1], [0, 0, 1, 1, 2, 2]], 6),                     # an unequal top level
         ([[0, 1, 1, 1], [0, 1, 2, 2, 3, 3, 3]], 7),               # a one-leaf class beside three
         ([[0, 1, 1, 1], [0, 1, 2, 3, 3], [0, 1, 2, 3, 3, 3, 3, 4, 4]], 9)]  # PBMC's tree


def symmetries(parents, n_leaves):
    """Every leaf permutation that keeps which leaves share a class at every level (brute force)."""
    same = [row[:, None] == row[None] for row in leaf_ancestors(parents, n_leaves)]
    for order in itertools.permutations(range(n_leaves)):
        order = np.array(order)
        if all((grouping == grouping[np.ix_(order, order)]).all() for grouping in same):
            yield order


@pytest.mark.parametrize("parents, n_leaves", TREES)
def test_least_conflict_naming_is_the_best_symmetry(parents, n_leaves):
    rng = np.random.default_rng(n_leaves)
    found = list(symmetries(parents, n_leaves))
    assert len(found) > 1                                           # every tree here has a symmetry
    ancestors = leaf_ancestors(parents, n_leaves)
    for _ in range(4):
        conflicts = rng.integers(0, 30, (n_leaves, n_leaves)).astype(float)
        naming, cost = least_conflict_naming(parents, n_leaves, conflicts)
        assert any((naming == order).all() for order in found)      # a symmetry of the tree ...
        assert cost == conflicts[np.arange(n_leaves), naming].sum()
        assert cost == min(conflicts[np.arange(n_leaves), order].sum() for order in found)  # ... the best one
        for row in ancestors:                                       # leaves sharing a class still do
            assert ((row[:, None] == row[None]) == (row[naming][:, None] == row[naming][None])).all()
    # where the labels do not tell (no conflict anywhere), every leaf keeps its name
    np.testing.assert_array_equal(least_conflict_naming(parents, n_leaves, np.zeros((n_leaves, n_leaves)))[0],
                                  np.arange(n_leaves))


def test_subtree_shapes_tell_same_shaped_subtrees_apart_from_others():
    children = tree_children([[0, 1, 1, 1], [0, 1, 2, 2, 3, 3, 3]], 7)
    shapes = subtree_shapes(children)
    assert children[1] == [[0], [1, 2, 3]] and children[2][3] == [4, 5, 6]
    assert shapes[1][0] != shapes[1][1]                            # a one-leaf chain vs three classes
    assert shapes[2][0] == shapes[2][1] != shapes[2][2] != shapes[2][3]   # one leaf, one, two, three


def four_blobs(seed=0, n=100):
    """Points at four centres, A1 A2 close together and B1 B2 close together (TWO_BY_TWO's shape)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [0.0, 4.0], [14.0, 0.0], [14.0, 4.0]])
    truth = np.repeat(np.arange(4), n)
    return centres[truth] + rng.normal(0, 0.3, (len(truth), 2)), truth


def top_labels(truth, top_of_blob, every=20):
    """allowed [n, 4]: every `every`-th point labelled with a top-level class (leaves 0-1 or 2-3)."""
    allowed = np.ones((len(truth), 4), bool)
    labelled = np.arange(len(truth)) % every == 0
    top = np.asarray(top_of_blob)[truth[labelled]]
    allowed[labelled] = np.array([[0, 0, 1, 1]]) == top[:, None]
    return allowed


@pytest.mark.parametrize("top_of_blob", [(0, 0, 1, 1), (1, 1, 0, 0)])
def test_named_grouping_takes_its_names_from_the_labels(top_of_blob):
    latent, truth = four_blobs()
    allowed = top_labels(truth, top_of_blob)
    leaf = tree_clustering(latent, [[0, 0, 1, 1]], 4, clusters_per_leaf=1, allowed=allowed, label_grouping="named")
    top = np.array([0, 0, 1, 1])[leaf]
    assert (top == np.asarray(top_of_blob)[truth]).all()            # every cell under its labelled class
    assert len(set(zip(truth, leaf))) == 4                          # one leaf per blob


def test_labels_the_latent_does_not_split_by_keep_the_labelled_grouping(capsys):
    """Labels pairing A1 with B1 exclude half the labelled cells from any label-free grouping."""
    latent, truth = four_blobs()
    allowed = top_labels(truth, (0, 1, 0, 1))
    labelled = tree_clustering(latent, [[0, 0, 1, 1]], 4, clusters_per_leaf=1, allowed=allowed)
    named = tree_clustering(latent, [[0, 0, 1, 1]], 4, clusters_per_leaf=1, allowed=allowed, label_grouping="named")
    np.testing.assert_array_equal(named, labelled)
    assert "the grouping made with the labels kept" in capsys.readouterr().out
    assert NAMED_TOLERANCE < 0.5


def test_label_grouping_is_a_refit_option_that_reaches_the_saved_model():
    assert "label_grouping" in REFIT_OPTIONS
    arguments = vars(build_parser().parse_args(["train", "data.h5ad", "--model", "tree", "--label-grouping", "named"]))
    from scvae_hier.hierarchy import Hierarchy
    hierarchy = Hierarchy("label", ["a", "b"], {"x": ("A", "A1"), "y": ("A", "A2"), "z": ("B", "B1")})
    chosen = TreeVAE.arguments_from(TrainOptions.from_dict(arguments), hierarchy)
    model = TreeVAE(7, level_sizes=(2, 3), parents=chosen["parents"], label_grouping=chosen["label_grouping"])
    assert model.get_config()["label_grouping"] == "named"
    config = model.get_config()
    del config["label_grouping"]                                  # a model file from before the option
    assert TreeVAE.from_config(config).label_grouping == "labelled"
    with pytest.raises(ValueError, match="label grouping"):
        TreeVAE(7, level_sizes=(2, 3), parents=chosen["parents"], label_grouping="names")


def test_training_and_refit_with_named_grouping_agree_end_to_end(pbmc_slice, tmp_path, capsys):
    """Level-1 labels on 20% of real cells: a run trained with --label-grouping named is what
    refitting the default run with it writes, cell for cell, and the run says which grouping it kept."""
    import anndata
    from conftest import FAST
    from scvae_hier import load_model
    from scvae_hier.cli import main
    common = ["train", str(pbmc_slice), "--model", "tree", *FAST, "--epochs", "3", "--reseed-epochs", "1",
              "--seed", "2", "--labelled", "level_1=0.2"]
    assert main([*common, "--output", str(tmp_path / "default")]) == 0
    assert main([*common, "--output", str(tmp_path / "named"), "--label-grouping", "named"]) == 0
    assert "Label-free grouping named by the labels:" in capsys.readouterr().out
    assert main(["refit", str(tmp_path / "default"), "--output", str(tmp_path / "refit"),
                 "--label-grouping", "named"]) == 0
    assert "Label-free grouping named by the labels:" in capsys.readouterr().out
    trained, refitted = (anndata.read_h5ad(tmp_path / run / "outputs.h5ad") for run in ("named", "refit"))
    for level in range(1, 5):
        np.testing.assert_array_equal(trained.obs[f"scvae_level_{level}"].astype(str),
                                      refitted.obs[f"scvae_level_{level}"].astype(str))
    assert load_model(tmp_path / "refit").label_grouping == "named"
    assert load_model(tmp_path / "default").label_grouping == "labelled"
