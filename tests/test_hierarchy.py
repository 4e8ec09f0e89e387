"""Hierarchy definitions: the shipped PBMC table, file formats, checks and label coding."""
import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from scvae_hier.hierarchy import Hierarchy, HierarchyError

DATA = Path(__file__).resolve().parent.parent / "data"
NINE = ["cd34_filtered", "b_cells", "cd56_nk", "cd4_t_helper", "regulatory_t", "naive_t",
        "memory_t", "cytotoxic_t", "naive_cytotoxic"]


@pytest.fixture(scope="module")
def pbmc_h():
    return Hierarchy.from_file(DATA / "pbmc_hierarchy.tsv")


@pytest.fixture(scope="module")
def pbmc_obs(pbmc):
    return pbmc.obs.copy()


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_hierarchy_structure(pbmc_h):
    assert pbmc_h.label_column == "source_library"
    assert pbmc_h.levels == ["level_1", "level_2", "level_3", "level_4"]
    assert pbmc_h.n_levels == 4
    assert pbmc_h.sizes == [2, 5, 6, 10]
    assert pbmc_h.classes(0) == ["Stem", "Non-stem"]
    assert pbmc_h.classes("level_2") == ["CD34 HSC", "B cell", "NK cell", "T cell", "Monocyte"]
    assert pbmc_h.paths["cd14_monocytes"] == ("Non-stem", "Monocyte", "Monocyte",
                                              "CD14+ monocyte")
    assert pbmc_h.paths["regulatory_t"] == ("Non-stem", "T cell", "CD4 T", "CD4+/CD25+ Treg")


def test_nine_populations_give_the_poster_sizes(pbmc_h, pbmc_obs):
    labels = pbmc_obs["source_library"].astype(str)
    nine = pbmc_h.restrict(labels[labels != "cd14_monocytes"])
    assert nine.sizes == [2, 4, 5, 9]
    assert list(nine.paths) == NINE
    assert nine.classes(2) == ["CD34 HSC", "B cell", "NK cell", "CD4 T", "CD8 T"]
    np.testing.assert_array_equal(nine.parent_index(1), [0, 1, 1, 1])
    np.testing.assert_array_equal(nine.parent_index(2), [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(nine.parent_index("level_4"), [0, 1, 2, 3, 3, 3, 3, 4, 4])


def test_shipped_labels_validate_and_match_shipped_levels(pbmc_h, pbmc_obs):
    labels = pbmc_obs["source_library"].astype(str).to_numpy()
    assert len(labels) == 9149
    pbmc_h.validate(labels)
    names = pbmc_h.level_labels(labels)
    codes = pbmc_h.level_codes(labels)
    assert names.shape == codes.shape == (9149, 4)
    for l, level in enumerate(pbmc_h.levels):
        np.testing.assert_array_equal(names[:, l], pbmc_obs[level].astype(str).to_numpy())
        np.testing.assert_array_equal(np.array(pbmc_h.classes(l))[codes[:, l]], names[:, l])
        # A cell's class at level l is the parent of its class at level l+1.
        if l:
            np.testing.assert_array_equal(pbmc_h.parent_index(l)[codes[:, l]], codes[:, l - 1])


def test_shipped_h5ad_carries_the_hierarchy(pbmc_h, pbmc):
    assert Hierarchy.from_anndata(pbmc) == pbmc_h
    assert pbmc.uns["provenance"]["source_file"] == "zheng2017_purified_pbmc_merged3sources.h5ad"


def test_from_obs_recovers_the_paths(pbmc_h, pbmc_obs):
    h = Hierarchy.from_obs(pbmc_obs, pbmc_h.levels, label_column="source_library")
    assert dict(h.paths) == dict(pbmc_h.paths)
    assert h.sizes == pbmc_h.sizes
    leaf = Hierarchy.from_obs(pbmc_obs, pbmc_h.levels)  # label column defaults to the last
    assert leaf.label_column == "level_4"
    assert leaf.paths["CD19+ B"] == ("Non-stem", "B cell", "B cell", "CD19+ B")


def test_from_obs_errors(pbmc_obs):
    with pytest.raises(HierarchyError, match=r"no column\(s\) \['level_9'\].*source_library"):
        Hierarchy.from_obs(pbmc_obs, ["level_1", "level_9"])
    obs = pd.DataFrame({"lab": ["a", "a", "b"], "top": ["X", "Y", "X"]})
    with pytest.raises(HierarchyError, match=r"1 label\(s\) of 'lab' map to more than one "
                                             r"path: 'a'"):
        Hierarchy.from_obs(obs, ["top"], label_column="lab")


def test_a_class_nobody_labelled_below_is_its_own_leaf():
    """Labels with holes: "Mono" is named at level 2 only, "DC" at level 3 with no leaf label; each
    becomes a path of its own (name repeated down), under the ancestors its cells name."""
    nan = np.nan
    obs = pd.DataFrame({"l1": ["Lym", "Lym", "Mye", nan, "Mye", "Mye", "Mye"],
                        "l2": ["T", "T", "Mono", "Mono", "Phago", "Phago", nan],
                        "l3": ["CD4", "CD8", nan, nan, "DC", nan, nan],
                        "l4": ["CD4n", "CD8n", nan, nan, nan, nan, nan]})
    h = Hierarchy.from_obs(obs, ["l1", "l2", "l3", "l4"], partial=True)
    assert h.paths == {"CD4n": ("Lym", "T", "CD4", "CD4n"), "CD8n": ("Lym", "T", "CD8", "CD8n"),
                       "DC": ("Mye", "Phago", "DC", "DC"), "Mono": ("Mye", "Mono", "Mono", "Mono")}
    # "Phago" has a child ("DC"), so it is not made a leaf too; without partial=True nothing changes.
    assert "Phago" not in h.paths
    with pytest.raises(HierarchyError, match="missing values"):
        Hierarchy.from_obs(obs, ["l1", "l2", "l3", "l4"])
    # Its place must be named by some cell, and only one place.
    unknown = obs.assign(l1=[nan if v == "Mono" else l1 for v, l1 in zip(obs["l2"], obs["l1"])])
    with pytest.raises(HierarchyError, match=r"'Mono' of level 'l2' \(2 cells\).*unknown.*\['l1'\]"):
        Hierarchy.from_obs(unknown, ["l1", "l2", "l3", "l4"], partial=True)
    twice = obs.assign(l1=["Lym", "Lym", "Mye", "Lym", "Mye", "Mye", "Mye"])
    with pytest.raises(HierarchyError, match=r"'Mono'.*ambiguous.*\[\['Mye'\], \['Lym'\]\]"):
        Hierarchy.from_obs(twice, ["l1", "l2", "l3", "l4"], partial=True)
    clash = obs.assign(l4=["CD4n", "Mono", nan, nan, nan, nan, nan])
    with pytest.raises(HierarchyError, match="'Mono' names a leaf"):
        Hierarchy.from_obs(clash, ["l1", "l2", "l3", "l4"], partial=True)


def test_dict_json_yaml_and_h5ad_round_trips(pbmc_h, tmp_path):
    d = pbmc_h.to_dict()
    json.dumps(d)
    assert Hierarchy.from_dict(d) == pbmc_h
    assert Hierarchy.from_file(write(tmp_path / "h.json", json.dumps(d))) == pbmc_h
    import yaml
    assert Hierarchy.from_file(write(tmp_path / "h.yaml", yaml.safe_dump(d))) == pbmc_h
    # Without the optional 'labels' key the order of 'paths' is used.
    d.pop("labels")
    assert Hierarchy.from_file(write(tmp_path / "h.yml", yaml.safe_dump(d, sort_keys=False))) \
        == pbmc_h
    # h5ad stores dicts sorted by key; 'labels' restores the file order (and so the codes).
    adata = anndata.AnnData(np.zeros((1, 1), dtype=np.float32))
    adata.uns["hierarchy"] = pbmc_h.to_dict()
    adata.write_h5ad(tmp_path / "h.h5ad")
    back = Hierarchy.from_anndata(anndata.read_h5ad(tmp_path / "h.h5ad"))
    assert back == pbmc_h and back.classes(3) == pbmc_h.classes(3)


def test_order_matters_for_equality(pbmc_h):
    reordered = Hierarchy(pbmc_h.label_column, pbmc_h.levels,
                          dict(reversed(list(pbmc_h.paths.items()))))
    assert reordered != pbmc_h
    assert reordered.classes(0) == ["Non-stem", "Stem"]
    assert "sizes=[2, 5, 6, 10]" in repr(pbmc_h)


def test_levels_must_nest(tmp_path):
    path = write(tmp_path / "h.tsv", "lab\tcoarse\tfine\n"
                                     "a\tX\tshared\n"
                                     "b\tY\tshared\n")
    with pytest.raises(HierarchyError, match=r"levels do not nest: class 'shared'.*\['X', 'Y'\]"):
        Hierarchy.from_file(path)


def test_tsv_errors_name_the_line(tmp_path):
    dup = write(tmp_path / "dup.tsv", "lab\tl1\tl2\na\tX\tx1\nb\tX\tx2\na\tX\tx3\n")
    with pytest.raises(HierarchyError, match=r"line 4: duplicate label 'a' \(first on line 2\)"):
        Hierarchy.from_file(dup)
    short = write(tmp_path / "short.tsv", "lab\tl1\tl2\na\tX\tx1\nb\tX\n")
    with pytest.raises(HierarchyError, match=r"line 3: 2 tab-separated fields, expected 3"):
        Hierarchy.from_file(short)
    header = write(tmp_path / "header.tsv", "lab\na\n")
    with pytest.raises(HierarchyError, match="bad header"):
        Hierarchy.from_file(header)
    empty_class = write(tmp_path / "empty.tsv", "lab\tl1\na\t \n")
    with pytest.raises(HierarchyError, match="empty class name"):
        Hierarchy.from_file(empty_class)
    with pytest.raises(HierarchyError, match="does not exist"):
        Hierarchy.from_file(tmp_path / "nope.tsv")
    with pytest.raises(HierarchyError, match="cannot parse"):
        Hierarchy.from_file(write(tmp_path / "bad.json", "{not json"))


def test_comments_and_blank_lines_are_ignored(tmp_path):
    path = write(tmp_path / "h.tsv", "# my hierarchy\nlab\tl1\tl2\n\na\tX\tx1\nb\tX\tx2\n")
    h = Hierarchy.from_file(path)
    assert h.sizes == [1, 2] and list(h.paths) == ["a", "b"]


def test_constructor_checks():
    with pytest.raises(HierarchyError, match="at least one level"):
        Hierarchy("lab", [], {"a": ()})
    with pytest.raises(HierarchyError, match=r"'a' has 1 classes \['X'\] but the hierarchy "
                                             r"has 2 levels"):
        Hierarchy("lab", ["l1", "l2"], {"a": ("X",)})
    with pytest.raises(HierarchyError, match="at least one label"):
        Hierarchy("lab", ["l1"], {})
    with pytest.raises(HierarchyError, match="lacks 'paths'"):
        Hierarchy.from_dict({"label_column": "lab", "levels": ["l1"]})


def test_validate_lists_missing_labels_with_counts(pbmc_h):
    labels = ["b_cells"] * 3 + ["platelets"] * 5 + ["dendritic"] * 2
    with pytest.raises(HierarchyError) as err:
        pbmc_h.validate(labels)
    message = str(err.value)
    assert "2 label(s) of column 'source_library' are not in the hierarchy" in message
    assert "'platelets' (5 cells), 'dendritic' (2 cells)" in message
    assert "hierarchy file" in message and "--exclude-labels platelets,dendritic" in message
    many = [f"unknown_{i}" for i in range(13)]
    with pytest.raises(HierarchyError, match="and 3 more"):
        pbmc_h.validate(many)
    with pytest.raises(HierarchyError, match="platelets"):
        pbmc_h.level_codes(labels)


def test_restrict_and_levels_by_name_or_index(pbmc_h):
    small = pbmc_h.restrict(["b_cells", "naive_t", "b_cells"])
    assert small.sizes == [1, 2, 2, 2]
    assert small.classes(-1) == small.classes("level_4") == ["CD19+ B",
                                                            "CD4+/CD45RA+/CD25- naive T"]
    np.testing.assert_array_equal(small.level_codes(["naive_t", "b_cells"]),
                                  [[0, 1, 1, 1], [0, 0, 0, 0]])
    with pytest.raises(HierarchyError, match="none of the hierarchy's labels"):
        pbmc_h.restrict(["platelets"])
    with pytest.raises(HierarchyError, match="unknown level 'level_7'"):
        pbmc_h.classes("level_7")
    with pytest.raises(HierarchyError, match="out of range"):
        pbmc_h.classes(4)
    with pytest.raises(HierarchyError, match="no parents"):
        pbmc_h.parent_index(0)


def test_from_anndata_without_hierarchy_says_how_to_fix():
    with pytest.raises(HierarchyError, match="--hierarchy"):
        Hierarchy.from_anndata(anndata.AnnData(np.zeros((1, 1), dtype=np.float32)))


def test_shipped_kang_data_carries_its_four_level_hierarchy():
    """data/kang2018.h5ad (data/build_kang.py): the second study, usable with no file outside the repository."""
    import anndata
    adata = anndata.read_h5ad(DATA / "kang2018.h5ad", backed="r")
    hierarchy = Hierarchy.from_anndata(adata)
    assert hierarchy.label_column == "cluster_id" and hierarchy.sizes == [2, 4, 6, 8]
    hierarchy.validate(adata.obs["cluster_id"].astype(str).to_numpy())
    assert adata.shape == (12261, 1287) and set(adata.obs["sample_id"].astype(str)).__len__() == 8


def test_siblings_and_the_classes_under_a_node_by_brute_force(pbmc_h):
    """siblings() against a search over the paths: the classes sharing the node's parent, climbing
    while the node is an only child; under() against "the node is on the value's path"."""
    levels = pbmc_h.paths.values()

    def by_paths(node):
        depth = max(i for p in levels for i, name in enumerate(p) if name == node)
        current = {node}
        while depth > 0:
            parent = {p[depth - 1] for p in levels if p[depth] in current}
            found = {p[depth] for p in levels if p[depth - 1] in parent} - current
            if found:
                return found
            depth, current = depth - 1, parent
        return {p[0] for p in levels} - current

    for level in range(pbmc_h.n_levels):
        for node in pbmc_h.classes(level):
            assert set(pbmc_h.siblings([node])) == by_paths(node), node
    assert pbmc_h.siblings(["CD8 T"]) == ["CD4 T"]
    assert set(pbmc_h.siblings(["CD19+ B"])) == {"NK cell", "T cell", "Monocyte"}   # B cell splits no further
    assert pbmc_h.siblings(["CD34+"]) == ["Non-stem"]
    assert pbmc_h.siblings(["CD4 T", "CD8 T"]) == pbmc_h.siblings(["T cell"])
    assert pbmc_h.siblings(["CD4+ helper", "CD8+ cytotoxic T"]) == [] and pbmc_h.siblings(["Neuron"]) == []
    values = np.array(pbmc_h.classes(3) + ["T cell", "unassigned", ""], dtype=object)
    for node in ("T cell", "CD8 T", "Non-stem", "CD34+", "unassigned"):
        expected = [any(node in p[:p.index(v) + 1] for p in levels if v in p) or v == node for v in values]
        np.testing.assert_array_equal(pbmc_h.under(values, [node]), expected, err_msg=node)
