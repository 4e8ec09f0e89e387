"""`scvae-hier evaluate` and `scvae-hier analyse` on runs trained on real PBMC cells: what they
print and write, recomputed independently, and the errors a user meets."""
import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, f1_score

from scvae_hier.analysis.scvae_runs import read_scvae_run
from scvae_hier.cli import main
from scvae_hier.hierarchy import Hierarchy

from conftest import FAST, scatter_points

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "scvae_reference" / "analyses_s0_model"
LEVELS = ["level_1", "level_2", "level_3", "level_4"]


def train(data, out, model, seed=0):
    code = main(["train", str(data), "--model", model, "--epochs", "3", "--warm-up", "1", "--seed", str(seed),
                 "--exclude-labels", "cd14_monocytes", "--output", str(out), *FAST])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(pbmc_slice, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    return {"momix": train(pbmc_slice, folder / "momix", "momix"),
            "mixture": train(pbmc_slice, folder / "mixture", "mixture"),
            "mixture_s1": train(pbmc_slice, folder / "mixture_s1", "mixture", seed=1)}


def test_evaluate_prints_bounds_and_levels_and_writes_what_it_printed(runs, capsys):
    run = runs["momix"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iwae-samples", "30"]) == 0
    printed = capsys.readouterr().out
    assert "MoMixVAE on 54 test cells" in printed and "IWAE ( 30)" in printed
    for level in LEVELS:
        assert level in printed
    assert "Hierarchy consistency" in printed

    folder = run / "evaluation" / "test"
    bounds = json.loads((folder / "bounds.json").read_text())
    split = pd.read_csv(run / "split.csv")
    assert bounds["n_cells"] == (split["set"] == "test").sum() == 54
    assert bounds["iwae_samples"] == 30
    # A bound with 30 importance samples is, on average over cells, above the one-sample ELBO.
    assert bounds["iwae"]["mean"] > bounds["terms"]["elbo"]["mean"]

    cells = anndata.read_h5ad(folder / "cells.h5ad")
    assert list(cells.obs_names) == list(split.loc[split["set"] == "test", "cell"])
    assert cells.n_vars == 80 and cells.obsm["X_scvae"].shape == (54, 4)
    np.testing.assert_allclose(cells.obs["scvae_iwae"].mean(), bounds["iwae"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(cells.obs["scvae_elbo"].mean(), bounds["terms"]["elbo"]["mean"], rtol=1e-6)
    assert cells.uns["scvae_evaluation"]["bounds"]["iwae_samples"] == 30

    # Every per-level score is recomputed here from the written AnnData, independently.
    table = pd.read_csv(folder / "level_metrics.csv", index_col="level")
    hierarchy = Hierarchy.from_dict(json.loads((run / "config.json").read_text())["hierarchy"])
    truth = hierarchy.level_labels(cells.obs["source_library"].astype(str).to_numpy())
    for i, level in enumerate(LEVELS):
        clusters = cells.obs[f"scvae_{level}_cluster"].astype(int).to_numpy()
        np.testing.assert_array_equal(clusters, cells.obsm[f"scvae_{level}_probabilities"].argmax(1))
        assert table.loc[level, "ari"] == pytest.approx(adjusted_rand_score(truth[:, i], clusters))
        assert table.loc[level, "n_clusters_used"] == len(set(clusters))
        assert cells.uns["scvae_evaluation"]["levels"][level]["ari"] == pytest.approx(table.loc[level, "ari"])
    per_class = json.loads((folder / "level_metrics.json").read_text())["per_class_f1"]
    assert set(per_class["level_1"]) == {"Stem", "Non-stem"}


def test_evaluate_other_sets_and_a_flat_model(runs, capsys):
    assert main(["evaluate", str(runs["mixture"]), "--set", "validation", "--iwae-samples", "5"]) == 0
    bounds = json.loads((runs["mixture"] / "evaluation" / "validation" / "bounds.json").read_text())
    split = pd.read_csv(runs["mixture"] / "split.csv")
    assert bounds["n_cells"] == (split["set"] == "validation").sum()
    assert main(["evaluate", str(runs["mixture"]), "--set", "all", "--iwae-samples", "5"]) == 0
    folder = runs["mixture"] / "evaluation" / "all"
    assert json.loads((folder / "bounds.json").read_text())["n_cells"] == 540
    record = json.loads((folder / "level_metrics.json").read_text())
    # One flat clustering, scored against every level: the same clusters at each level.
    assert record["hierarchy_consistency"] is None
    assert len({row["n_clusters_used"] for row in record["levels"].values()}) == 1
    cells = anndata.read_h5ad(folder / "cells.h5ad")
    assert "scvae_cluster" in cells.obs and cells.obsm["scvae_cluster_probabilities"].shape == (540, 9)


def test_evaluate_another_file_by_gene_name_and_refuse_missing_genes(runs, pbmc_slice, tmp_path, capsys):
    run = runs["momix"]
    genes = json.loads((run / "config.json").read_text())["genes"]
    adata = anndata.read_h5ad(pbmc_slice)[:300]
    # Another file: the model's genes shuffled among others still evaluate (matched by name).
    shuffled = adata[:, np.random.default_rng(1).permutation(adata.n_vars)].copy()
    other = tmp_path / "other.h5ad"
    shuffled.write_h5ad(other)
    assert main(["evaluate", str(run), "--data", str(other), "--iwae-samples", "5"]) == 0
    cells = anndata.read_h5ad(run / "evaluation" / "other-all" / "cells.h5ad")
    assert list(cells.var_names) == genes and cells.n_obs == (adata.obs["source_library"] != "cd14_monocytes").sum()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(other), "--set", "test"]) == 2
    assert "--set all" in capsys.readouterr().err

    lacking = adata[:, [g for g in adata.var_names if g != genes[3]]].copy()
    lacking.write_h5ad(tmp_path / "lacking.h5ad")
    assert main(["evaluate", str(run), "--data", str(tmp_path / "lacking.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and genes[3] in err


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a scvae-hier run folder" in capsys.readouterr().err


def test_analyse_one_run_writes_figures_and_report(runs, drawn_figures):
    run = runs["momix"]
    assert main(["analyse", str(run), "--iwae-samples", "5"]) == 0
    names = ["true_vs_predicted", "hierarchy_matrix", "learning_curves", "confusion_matrices"]
    for name in names:
        assert (run / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(drawn_figures) == sorted(f"{name}.png" for name in names)
    # What the figures show: every cell of the run in each scatter, one panel per level.
    truth, predicted = drawn_figures["true_vs_predicted.png"].axes[:4], drawn_figures["true_vs_predicted.png"].axes[4:]
    assert [ax.get_title() for ax in truth] == [f"{level}: true classes" for level in LEVELS]
    assert all(ax.get_title().startswith(f"{level}: predicted clusters (ARI ") for ax, level in zip(predicted, LEVELS))
    assert all(scatter_points(ax) == [540] for ax in truth + predicted)
    matrix = drawn_figures["hierarchy_matrix.png"].axes  # one latent for every level: one row
    assert [ax.get_title() for ax in matrix] == [f"coloured by {level}" for level in LEVELS]
    assert all(scatter_points(ax) == [540] for ax in matrix)
    confusion = [ax for ax in drawn_figures["confusion_matrices.png"].axes if ax.images]
    assert [ax.images[0].get_array().shape[0] for ax in confusion] == [2, 4, 5, 9]  # true classes per level
    assert all(sum(int(t.get_text()) for t in ax.texts) == 540 for ax in confusion)
    report = (run / "report.md").read_text()
    for name in names:
        assert f"(figures/{name}.png)" in report
    assert "| level_4 |" in report and "Hierarchy consistency" in report and "IWAE" in report


def test_analyse_compares_runs_with_original_scvae_on_the_same_cells(runs, tmp_path, drawn_figures):
    out = tmp_path / "comparison"
    argv = ["analyse", str(runs["momix"]), str(runs["mixture"]), str(runs["mixture_s1"]),
            "--scvae", str(FIXTURE), "--output", str(out), "--iwae-samples", "5", "--embedding", "tsne"]
    assert main(argv) == 0
    rows = pd.read_csv(out / "runs.csv")
    summary = pd.read_csv(out / "summary.csv").set_index(["group", "level"])
    assert set(summary.index.get_level_values("group")) == {"MoMixVAE Normal", "MixtureVAE Normal",
                                                           "original scVAE"}
    # The two mixture seeds have different test cells; scVAE is scored on each distinct cell set.
    assert summary.loc[("MixtureVAE Normal", "level_4"), "n_runs"] == 2
    assert summary.loc[("original scVAE", "level_4"), "n_runs"] == 2
    mixture = rows[(rows["group"] == "MixtureVAE Normal") & (rows["level"] == "level_2")]
    assert summary.loc[("MixtureVAE Normal", "level_2"), "ari_mean"] == pytest.approx(mixture["ari"].mean())

    # scVAE's score on our first run's test cells, recomputed from its cluster-id file directly.
    scvae = read_scvae_run(FIXTURE)
    cells = anndata.read_h5ad(runs["momix"] / "evaluation" / "test" / "cells.h5ad")
    hierarchy = Hierarchy.from_dict(json.loads((runs["momix"] / "config.json").read_text())["hierarchy"])
    truth = hierarchy.level_labels(cells.obs["source_library"].astype(str).to_numpy())
    clusters = scvae.cluster_ids.loc[cells.obs_names].to_numpy()
    first = rows[(rows["group"] == "original scVAE") & rows["run"].str.contains(str(runs["momix"]))]
    for i, level in enumerate(LEVELS):
        row = first[first["level"] == level].iloc[0]
        assert row["ari"] == pytest.approx(adjusted_rand_score(truth[:, i], clusters))
        assert row["n_cells"] == cells.n_obs
    # Weighted F1 with the Hungarian matching, recomputed with sklearn on the matched labels.
    from scvae_hier.metrics import hungarian_mapping
    mapping = hungarian_mapping(truth[:, 3], clusters)
    mapped = np.array([mapping.get(c, "unmatched") for c in clusters])
    assert first[first["level"] == "level_4"].iloc[0]["f1_weighted"] == pytest.approx(
        f1_score(truth[:, 3], mapped, average="weighted", labels=sorted(set(truth[:, 3]))))

    report = (out / "report.md").read_text()
    assert "original scVAE" in report and "figure1_level_4.png" in report
    figure_one = drawn_figures["figure1_level_4.png"]
    assert (out / "figure1_level_4.png").is_file()
    assert [ax.get_title() for ax in figure_one.axes] == ["weighted F1 vs IWAE at level_4", "ARI vs IWAE at level_4"]
    legend = [t.get_text() for t in figure_one.axes[1].get_legend().get_texts()]
    assert sorted(legend) == sorted(["MoMixVAE Normal (n=1)", "MixtureVAE Normal (n=2)", "original scVAE (n=2), no IWAE"])
    for group in ("momixvae_normal", "mixturevae_normal"):
        assert (out / "figures" / group / "true_vs_predicted.png").is_file()


def test_analyse_refuses_an_scvae_run_on_other_cells(runs, tmp_path, capsys):
    scvae_cells = set(read_scvae_run(FIXTURE).cluster_ids.index)
    cells = anndata.read_h5ad(runs["momix"] / "evaluation" / "test" / "cells.h5ad")
    assert set(cells.obs_names) <= scvae_cells  # the real case works (previous test) ...
    renamed = tmp_path / "renamed_run"
    import shutil
    shutil.copytree(runs["momix"], renamed)
    fake = anndata.read_h5ad(renamed / "evaluation" / "test" / "cells.h5ad")
    fake.obs_names = [f"other-{name}" for name in fake.obs_names]
    fake.write_h5ad(renamed / "evaluation" / "test" / "cells.h5ad")
    capsys.readouterr()
    code = main(["analyse", str(renamed), "--scvae", str(FIXTURE), "--output", str(tmp_path / "c"), "--no-figures"])
    assert code == 2
    assert "same cells" in capsys.readouterr().err


def test_a_plain_vae_is_evaluated_without_levels_and_not_analysed(pbmc_slice, tmp_path, capsys):
    run = train(pbmc_slice, tmp_path / "vae", "vae")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iwae-samples", "5"]) == 0
    printed = capsys.readouterr().out
    assert "IWAE (  5)" in printed and "No per-level scores" in printed
    assert not (run / "evaluation" / "test" / "level_metrics.csv").exists()
    assert main(["analyse", str(run)]) == 2
    assert "without clusters" in capsys.readouterr().err
