"""`scvae-hier experiment`: a small cross-validated experiment on real cells, end to end, and
that a second invocation skips finished runs."""
from pathlib import Path

import pandas as pd
import pytest
import yaml

from scvae_hier.analysis.experiment import ExperimentError, planned_runs, read_config
from scvae_hier.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "scvae_reference" / "analyses_s0_model"


def write_config(tmp_path, data, **changes):
    config = {"data": str(data), "folds": 2, "seed": 0, "runs": str(tmp_path / "runs"),
              "results": str(tmp_path / "results"), "iwae_samples": 5, "level": "level_4", "scvae": str(FIXTURE),
              "options": {"exclude_labels": ["cd14_monocytes"], "n_genes": 80, "latent_dim": 4, "hidden": [16, 16],
                          "batch_size": 64, "epochs": 2, "warm_up": 1, "xla": False},
              # A flat baseline named by its model and prior, and a hierarchical model named by the user.
              "models": [{"model": "mixture", "prior": "normal"},
                         {"model": "momix", "prior": "student-t", "name": "MoMixVAE log1p", "input_transform": "log1p"}]}
    config.update(changes)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_experiment_runs_every_fold_and_model_then_skips_finished_runs(pbmc_slice, tmp_path, capsys, drawn_figures):
    config = write_config(tmp_path, pbmc_slice, peers=True)
    assert main(["experiment", str(config)]) == 0
    results = tmp_path / "results"
    for name in ("report.md", "summary.csv", "runs.csv", "targets.csv", "poster.csv", "level_1.csv",
                 "experiment.json", "figure1_level_4.png", "figures/mixturevae_normal/true_vs_predicted.png",
                 "figures/momixvae_log1p/hierarchy_matrix.png"):
        assert (results / name).is_file(), name
    legend = [t.get_text() for t in drawn_figures["figure1_level_4.png"].axes[1].get_legend().get_texts()]
    peers = ["Leiden on MixtureVAE Normal's latent", "Leiden on MoMixVAE log1p's latent", "scanpy PCA + Leiden"]
    assert sorted(legend) == sorted(["MixtureVAE Normal (n=2)", "MoMixVAE log1p (n=2)"] + [
        f"{group} (n=2), no IWAE" for group in peers + ["original scVAE"]])
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary["group"]) == {"MixtureVAE Normal", "MoMixVAE log1p", "original scVAE", *peers}
    assert (summary["n_runs"] == 2).all()  # two folds each; scVAE and scanpy scored once per fold's cells
    # Nesting: none for a flat clustering or at level 1 (no level above), a share elsewhere.
    nested = summary.set_index(["group", "level"])["nesting_mean"]
    assert nested.loc["MixtureVAE Normal"].isna().all() and nested.xs("level_1", level="level").isna().all()
    assert nested.loc["MoMixVAE log1p"].iloc[1:].between(0, 1).all()
    assert nested.loc["scanpy PCA + Leiden"].iloc[1:].between(0, 1).all()
    runs = pd.read_csv(results / "runs.csv")
    ours = runs[runs["group"].isin(["MixtureVAE Normal", "MoMixVAE log1p"])]
    # The peers scored the same cells: each model's latent per run, scanpy once per fold.
    assert (runs[runs["group"].str.startswith("Leiden on")].groupby("run")["n_cells"].first().sum()
            == ours.groupby("run")["n_cells"].first().sum())
    # The two folds test disjoint cells that together cover all 540.
    assert ours.groupby("run")["n_cells"].first().groupby(lambda r: r.endswith("f0")).sum().sum() == 540 * 2
    targets = pd.read_csv(results / "targets.csv")
    assert list(targets["model"]) == ["MoMixVAE log1p"]  # hierarchical models only, against the baselines:
    assert {"ARI at or above MixtureVAE Normal", "ARI at or above original scVAE",
            "ARI at or above scanpy PCA + Leiden"} <= set(targets.columns)
    assert targets.filter(like="level_4 ari").iloc[:, 0].str.fullmatch(r"-?\d\.\d{3} (met|not met)").all()
    level_one = pd.read_csv(results / "level_1.csv")
    assert len(level_one) == 4 and level_one["top_split (cluster: finest classes >= 10%)"].str.len().gt(0).all()
    report = (results / "report.md").read_text()
    assert "Beside the poster" in report and "Targets" in report and "stem" in report.lower()
    # The named run really used its own option.
    assert "log1p" in (tmp_path / "runs" / "momixvae_log1p-f1" / "config.json").read_text()

    capsys.readouterr()
    assert main(["experiment", str(config), "--folds", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 2 and "training" not in printed


def test_experiment_config_errors_name_the_problem(tmp_path):
    (tmp_path / "short.yaml").write_text("data: x.h5ad\n")
    with pytest.raises(ExperimentError, match="lacks folds, models, runs, results"):
        read_config(tmp_path / "short.yaml")
    path = write_config(tmp_path, "x.h5ad", options={"epochz": 3})
    with pytest.raises(ExperimentError, match="unknown training option.*epochz"):
        read_config(path)
    plan = planned_runs(read_config(write_config(tmp_path, "x.h5ad")))
    assert [(o.fold, o.model, o.prior) for _, o in plan] == [(0, "mixture", "normal"), (0, "momix", "student-t"),
                                                            (1, "mixture", "normal"), (1, "momix", "student-t")]
    assert all(o.folds == 2 and o.n_genes == 80 for _, o in plan) and len(plan) == 4
    twins = [{"model": "momix", "prior": "normal"}, {"model": "momix", "prior": "normal", "normalisation": "layer"}]
    with pytest.raises(ExperimentError, match="share the run folder .*momix-normal-f0.*its own `name`"):
        planned_runs(read_config(write_config(tmp_path, "x.h5ad", models=twins)))
    twins[1]["name"] = "MoMixVAE layer norm"
    assert [o.output for _, o in planned_runs(read_config(write_config(tmp_path, "x.h5ad", models=twins)))][:2] == [
        str(tmp_path / "runs" / "momix-normal-f0"), str(tmp_path / "runs" / "momixvae_layer_norm-f0")]
    twins[0]["name"] = "MoMixVAE, layer norm"  # the same folder through another spelling
    with pytest.raises(ExperimentError, match="momixvae_layer_norm-f0"):
        planned_runs(read_config(write_config(tmp_path, "x.h5ad", models=twins)))
