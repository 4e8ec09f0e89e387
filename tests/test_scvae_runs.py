"""The scVAE 2.1.4 reader on a real run of the original scVAE on our cells."""
import gzip
import operator
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from scvae_hier.analysis.scvae_runs import (ScvaeRunError, find_scvae_runs, parse_metrics_log,
                                 parse_prediction_log, read_scvae_run, scvae_level_scores)
from scvae_hier.hierarchy import Hierarchy

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "scvae_reference"
SET = ("pbmc9/no_split/no_preprocessing/GMVAE/gaussian_mixture-c_9/"
       "negative_binomial-l_20-h_100_100-mc_1-iw_1-bn-wu_5/run_s0/e_100-mc_1-iw_1/full")


class _Computed:
    """Unpickles by calling operator.add: code a pickle runs on load, which the reader refuses."""

    def __reduce__(self):
        return operator.add, (0.5, 0.25)


@pytest.fixture(scope="module")
def model_run():
    return read_scvae_run(FIXTURE / "analyses_s0_model")


@pytest.fixture(scope="module")
def kmeans_run():
    return read_scvae_run(FIXTURE / "analyses_s0_k-means")


@pytest.fixture(scope="module")
def hierarchy_and_labels(pbmc):
    return Hierarchy.from_anndata(pbmc), pbmc.obs["source_library"].astype(str)


def test_finds_both_evaluations_and_refuses_to_guess():
    runs = find_scvae_runs(FIXTURE)
    assert runs == [FIXTURE / "analyses_s0_k-means" / SET, FIXTURE / "analyses_s0_model" / SET]
    with pytest.raises(ScvaeRunError, match="holds 2 scVAE runs") as err:
        read_scvae_run(FIXTURE)
    assert "analyses_s0_model" in str(err.value) and "analyses_s0_k-means" in str(err.value)


def test_model_run_contents(model_run):
    run = model_run
    assert run.path == FIXTURE / "analyses_s0_model" / SET
    assert len(run.cluster_ids) == 8391 and run.cluster_ids.index.is_unique
    assert set(run.cluster_ids) == set(range(9))
    assert run.latent_z.shape == (8391, 20) and run.latent_y.shape == (8391, 9)
    assert np.allclose(run.latent_y.sum(axis=1), 1.0, atol=1e-5)
    assert (run.latent_z.index == run.cluster_ids.index).all()
    # the model's clusters are argmax q(y|x), column k being cluster k
    assert (run.latent_y.to_numpy().argmax(axis=1) == run.cluster_ids.to_numpy()).all()
    assert run.predicted_labels.loc["CGTGATGATTTCAC-1-b_cells"] == "b_cells"


def test_settings_from_path(model_run, kmeans_run):
    s = model_run.settings
    assert (s["data_set"], s["split"], s["model_type"]) == ("pbmc9", "no_split", "GMVAE")
    assert (s["latent_distribution"], s["n_clusters"]) == ("gaussian_mixture", 9)
    assert (s["likelihood"], s["latent_size"], s["hidden_sizes"]) == ("negative_binomial", 20, [100, 100])
    assert (s["batch_norm"], s["warm_up"], s["run_id"], s["epochs"]) == (True, 5, "s0", 100)
    assert (s["evaluation_set"], s["prediction_method"]) == ("full", "model")
    assert kmeans_run.settings["prediction_method"] == "k-means"
    assert kmeans_run.settings["prediction"] == "kmeans_9_full"


def test_metrics_from_pickle_and_log(model_run):
    assert round(model_run.metrics["ELBO"], 2) == -206.54
    assert model_run.metrics["accuracy"] == pytest.approx(0.7137, abs=1e-4)
    log = parse_metrics_log((model_run.path / "full-metrics.log").read_text())
    assert log == pytest.approx({"ELBO": -206.54, "ENRE": -199.47, "KL_z": 5.4191,
                                 "KL_y": 1.6412, "accuracy": 0.7137})
    logged, method = parse_prediction_log((model_run.path / "full-prediction-model_9.log").read_text())
    assert method == "model"
    assert logged["ARI_clusters"] == 0.69628 and logged["AMI_labels"] == 0.65802
    assert set(logged) == set(model_run.prediction_metrics)
    for key, value in logged.items():
        assert model_run.prediction_metrics[key] == pytest.approx(value, abs=1e-5)


def test_falls_back_to_logs_when_pickles_are_unreadable_or_unsafe(tmp_path):
    copy = tmp_path / "analyses"
    shutil.copytree(FIXTURE / "analyses_s0_model", copy)
    folder = copy / SET
    (folder / "full-metrics.pkl.gz").write_bytes(b"not a pickle")
    unsafe = {"prediction method": "model",
              "clustering metric values": {"adjusted Rand index": {"clusters": _Computed()}}}
    with gzip.open(folder / "full-prediction-model_9.pkl.gz", "wb") as handle:
        pickle.dump(unsafe, handle)
    run = read_scvae_run(copy)
    assert run.metrics["ELBO"] == -206.54 and run.metrics["KL_y"] == 1.6412
    assert run.prediction_metrics["ARI_clusters"] == 0.69628
    assert run.settings["prediction_method"] == "model"
    with pytest.raises(ScvaeRunError, match="kmeans_9"):
        read_scvae_run(copy, prediction="kmeans_9")


def test_level_scores_reproduce_scvae_ari(model_run, kmeans_run, hierarchy_and_labels):
    hierarchy, labels = hierarchy_and_labels
    for run, logged in ((model_run, 0.696), (kmeans_run, 0.489)):
        df = scvae_level_scores(run, hierarchy, labels)
        assert list(df.index) == ["level_1", "level_2", "level_3", "level_4"]
        assert df.attrs["n_cells"] == 8391
        assert list(df["n_classes"]) == [2, 4, 5, 9]
        assert round(df.loc["level_4", "ari"], 3) == logged
        assert round(df.loc["level_4", "ari"], 3) == round(run.prediction_metrics["ARI_clusters"], 3)
        assert round(df.loc["level_4", "ami"], 3) == round(run.prediction_metrics["AMI_clusters"], 3)
        # scVAE's mapped labels give its logged 'Labels' ARI
        cells = run.predicted_labels.index
        assert round(adjusted_rand_score(labels.loc[cells], run.predicted_labels), 3) == \
            round(run.prediction_metrics["ARI_labels"], 3)
    # scVAE's accuracy is the majority mapping of the model's own clusters
    model = scvae_level_scores(model_run, hierarchy, labels)
    assert model.loc["level_4", "accuracy_majority"] == pytest.approx(model_run.metrics["accuracy"])


def test_folder_without_scvae_output(tmp_path):
    (tmp_path / "something.txt").write_text("hello")
    with pytest.raises(ScvaeRunError, match="metrics.log"):
        find_scvae_runs(tmp_path)
    with pytest.raises(ScvaeRunError, match="no scVAE output"):
        read_scvae_run(tmp_path)
    with pytest.raises(ScvaeRunError, match="not a folder"):
        find_scvae_runs(tmp_path / "missing")
    (tmp_path / "models" / "run_s0").mkdir(parents=True)  # scVAE's -M folder: checkpoints, no analyses
    with pytest.raises(ScvaeRunError, match="no scVAE output"):
        read_scvae_run(tmp_path / "models")


def test_cells_that_do_not_match(model_run, hierarchy_and_labels):
    hierarchy, labels = hierarchy_and_labels
    renamed = pd.Series(labels.to_numpy(), index="other-" + labels.index.astype(str))
    with pytest.raises(ScvaeRunError, match="only 0 of the run's 8391 cells"):
        scvae_level_scores(model_run, hierarchy, renamed)
    half = labels.loc[model_run.cluster_ids.index[::2]]
    with pytest.raises(ScvaeRunError, match="only 4196 of the run's 8391"):
        scvae_level_scores(model_run, hierarchy, half)
    # a few missing cells are tolerated and scored on the rest
    most = labels.drop(model_run.cluster_ids.index[:100])
    assert scvae_level_scores(model_run, hierarchy, most).attrs["n_cells"] == 8291


def test_the_kang_reference_run_is_of_kangs_cells_and_its_scores_reproduce():
    """The shipped scVAE run on Kang (data/scvae_reference_kang) holds every cell of the shipped
    Kang file by obs_name, and our level scores give scVAE's own logged level-4 ARI and AMI."""
    import anndata
    root = Path(__file__).resolve().parents[1] / "data"
    kang = anndata.read_h5ad(root / "kang2018.h5ad", backed="r")
    hierarchy = Hierarchy.from_anndata(kang)
    logged = {"s0": 0.4271, "s1": 0.4262, "s2": 0.4042}          # its evaluate_<run>_model.log, "Clusters"
    for name, ari in logged.items():
        run = read_scvae_run(root / "scvae_reference_kang" / f"analyses_{name}_model")
        assert set(run.cluster_ids.index) == set(kang.obs_names) and run.cluster_ids.nunique() <= 8
        levels = scvae_level_scores(run, hierarchy, kang.obs[hierarchy.label_column].astype(str))
        assert levels.attrs["n_cells"] == 12261 and list(levels["n_classes"]) == [2, 4, 6, 8]
        assert round(levels.loc["level_4", "ari"], 4) == round(run.prediction_metrics["ARI_clusters"], 4) == ari
        assert round(levels.loc["level_4", "ami"], 3) == round(run.prediction_metrics["AMI_clusters"], 3)
