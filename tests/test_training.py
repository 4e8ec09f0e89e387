"""Training on real PBMC cells: the CLI end to end, reload in a fresh process, resume after an
interruption, early stopping, and the errors a user meets."""
import json
import re
import subprocess
import sys

import anndata
import keras
import numpy as np
import pandas as pd
import pytest

import scvae_hier
from scvae_hier import training
from scvae_hier.cli import main
from scvae_hier.options import TrainOptions
from scvae_hier.outputs import predict_outputs
from scvae_hier.runs import ModelFileError, RunDirectory, load_model

from conftest import FAST, PBMC_HIERARCHY

# Every other training in the suite passes --no-xla (conftest.FAST) or xla=False: XLA compiling
# costs more than the few epochs they train. This test trains on the default path, with XLA.
XLA = [a for a in FAST if a != "--no-xla"]
assert XLA != FAST


def assert_reloads_exactly(run_folder, keys):
    """In this process: load_model on the run folder reproduces the saved outputs bit for bit."""
    outputs = anndata.read_h5ad(RunDirectory(run_folder).outputs)
    new = predict_outputs(load_model(run_folder), outputs.X, 1024)
    np.testing.assert_array_equal(new["latent"], outputs.obsm["X_scvae"])
    for name, key in keys.items():
        np.testing.assert_array_equal(new[name], outputs.obsm[key], err_msg=key)


def test_cli_trains_with_xla_writes_run_and_reloads_exactly(pbmc_slice, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(pbmc_slice), "--model", "mixture", "--epochs", "4", "--warm-up", "2",
                 "--exclude-labels", "cd14_monocytes", "--output", str(out), *XLA])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"Run written to {out}" in printed
    assert "ARI of clusters vs hierarchy levels (all cells): level_1" in printed and "level_4" in printed
    run = RunDirectory(out)
    for path in (run.model, run.config, run.history, run.split, run.outputs, run.metrics):
        assert path.exists(), path
    config = run.read_config()
    assert config["options"]["model"] == "mixture" and config["model_arguments"]["n_components"] == 9
    assert config["options"]["xla"] is True  # the default path
    assert len(config["genes"]) == 80 and config["n_cells"] == 540
    assert config["hierarchy"]["levels"] == ["level_1", "level_2", "level_3", "level_4"]
    assert len(config["data_checksum"]) == 64
    history = pd.read_csv(run.history)
    assert list(history["epoch"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(history["kl_weight"], [0.0, 0.5, 1.0, 1.0])
    for term in ("elbo", "reconstruction", "kl_z", "kl_y", "components_used"):
        assert term in history and f"val_{term}" in history
    split = pd.read_csv(run.split)
    assert split["set"].value_counts().to_dict() == config["split_counts"]

    outputs = anndata.read_h5ad(run.outputs)
    assert outputs.n_obs == 540 and "cd14_monocytes" not in set(outputs.obs["source_library"])
    assert outputs.obsm["X_scvae"].shape == (540, 4)
    probabilities = outputs.obsm["scvae_cluster_probabilities"]
    assert probabilities.shape == (540, 9)
    np.testing.assert_array_equal(outputs.obs["scvae_cluster"].astype(int), probabilities.argmax(1))
    metrics = json.loads(run.metrics.read_text())
    assert set(metrics["ari"]["all"]) == {"level_1", "level_2", "level_3", "level_4"}

    # The saved model reproduces the saved outputs bit for bit (in a fresh process: the momix test).
    assert_reloads_exactly(out, {"cluster_probabilities": "scvae_cluster_probabilities"})


# The suite's one reload in a fresh Python process (nothing registered or cached by this one).
RELOAD_CHECK = (
    "import sys, numpy as np, anndata, scvae_hier\n"
    "from scvae_hier.outputs import predict_outputs\n"
    "run, keys = sys.argv[1], sys.argv[2:]\n"
    "out = anndata.read_h5ad(run + '/outputs.h5ad')\n"
    "new = predict_outputs(scvae_hier.load_model(run), out.X, 1024)\n"
    "assert np.array_equal(new['latent'], out.obsm['X_scvae'])\n"
    "for i, key in enumerate(keys, start=1):\n"
    "    assert np.array_equal(new[f'level_{i}_probabilities'], out.obsm[key]), key\n"
    "print('IDENTICAL')\n")


@pytest.mark.parametrize("model", ["indmom", "momix"])
def test_cli_trains_hierarchical_models_with_per_level_outputs(pbmc_slice, tmp_path, capsys, model):
    out = tmp_path / model
    code = main(["train", str(pbmc_slice), "--model", model, "--epochs", "3", "--warm-up", "1",
                 "--exclude-labels", "cd14_monocytes", "--output", str(out), *FAST])
    printed = capsys.readouterr().out
    assert code == 0 and "level_4" in printed
    run = RunDirectory(out)
    config = run.read_config()
    assert config["model_arguments"]["level_sizes"] == [2, 4, 5, 9]
    history = pd.read_csv(run.history)
    for level in range(1, 5):
        assert f"val_components_used_{level}" in history and f"kl_y_{level}" in history
    np.testing.assert_allclose(history["kl_y"], history[[f"kl_y_{l}" for l in range(1, 5)]].sum(1)
                               / (4 if model == "indmom" else 1), rtol=1e-4)
    outputs = anndata.read_h5ad(run.outputs)
    keys = []
    for level, k in zip(["level_1", "level_2", "level_3", "level_4"], [2, 4, 5, 9]):
        probabilities = outputs.obsm[f"scvae_{level}_probabilities"]
        assert probabilities.shape == (540, k)
        np.testing.assert_array_equal(outputs.obs[f"scvae_{level}_cluster"].astype(int), probabilities.argmax(1))
        keys.append(f"scvae_{level}_probabilities")
    metrics = json.loads(run.metrics.read_text())
    assert set(metrics["ari"]["test"]) == {"level_1", "level_2", "level_3", "level_4"}
    if model == "momix":  # the richest saved model (nested prior, transitions, four levels)
        result = subprocess.run([sys.executable, "-c", RELOAD_CHECK, str(out), *keys], capture_output=True,
                                text=True)
        assert "IDENTICAL" in result.stdout, result.stderr[-2000:]
    else:
        assert_reloads_exactly(out, {f"level_{i}_probabilities": key for i, key in enumerate(keys, start=1)})


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(pbmc_slice, tmp_path, monkeypatch):
    base = dict(data=str(pbmc_slice), model="mixture", epochs=4, warm_up=1, n_genes=60, drop_empty_cells=True, latent_dim=3,
                hidden=(12,), batch_size=64, patience=10, xla=False)
    straight = training.train(TrainOptions(**base, output=str(tmp_path / "straight")), log=lambda *_: None)

    original = training.TrainingState.on_epoch_end

    def stop_after_second_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise Interrupt  # as if the machine went down right after the epoch-2 checkpoint

    monkeypatch.setattr(training.TrainingState, "on_epoch_end", stop_after_second_epoch)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        training.train(TrainOptions(**base, output=str(interrupted)), log=lambda *_: None)
    monkeypatch.setattr(training.TrainingState, "on_epoch_end", original)
    run = RunDirectory(interrupted)
    assert run.has_checkpoint() and not run.is_finished()

    # Without --resume the folder is protected and the message says how to continue.
    with pytest.raises(FileExistsError, match="--resume"):
        training.train(TrainOptions(**base, output=str(interrupted)), log=lambda *_: None)

    messages = []
    training.train(TrainOptions(data=str(pbmc_slice), output=str(interrupted), resume=True), log=messages.append)
    assert any("Resuming" in m and "after epoch 2" in m for m in messages)
    a, b = pd.read_csv(RunDirectory(straight).history), pd.read_csv(run.history)
    assert list(b["epoch"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(b.drop(columns="epoch"), a.drop(columns="epoch"), rtol=1e-5)
    out_a, out_b = anndata.read_h5ad(RunDirectory(straight).outputs), anndata.read_h5ad(run.outputs)
    np.testing.assert_allclose(out_b.obsm["X_scvae"], out_a.obsm["X_scvae"], rtol=1e-5, atol=1e-6)


def test_early_stopping_stops_and_restores_the_best_weights(tmp_path):
    run = RunDirectory(tmp_path)
    run.checkpoint_dir.mkdir(parents=True)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.kl_weight = keras.Variable(1.0)
    model.compile(optimizer="adam", loss="mse", jit_compile=False)
    state = training.TrainingState(run, "val_elbo", patience=2, first_epoch=1, log=lambda *_: None)
    state.set_model(model)
    # Epoch 0 is warm-up (never best even though its value is highest); epoch 2 is the best.
    values = [5.0, -3.0, -1.0, -2.0, -1.5]
    best_kernel = None
    for epoch, value in enumerate(values):
        model.layers[0].kernel.assign(np.full((2, 1), float(epoch), "float32"))
        if epoch == 2:
            best_kernel = model.layers[0].kernel.numpy().copy()
        state.on_epoch_end(epoch, {"val_elbo": value})
        assert model.stop_training == (epoch == 4)
    assert state.state["best_epoch"] == 2 and state.state["wait"] == 2
    state.on_train_end()
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), best_kernel)
    saved = json.loads(run.checkpoint_state.read_text())
    assert saved["epoch"] == 4 and saved["best"] == -1.0
    assert len(pd.read_csv(run.history)) == 5


def test_real_training_stops_early_when_validation_stalls(pbmc_slice, tmp_path):
    # A learning rate of 0 makes the validation ELBO stall from the first epoch after warm-up.
    path = training.train(TrainOptions(data=str(pbmc_slice), model="vae", epochs=30, warm_up=0, patience=2,
                                       learning_rate=0.0, n_genes=40, drop_empty_cells=True, latent_dim=2, hidden=(8,),
                                       xla=False, output=str(tmp_path / "run")), log=lambda *_: None)
    metrics = json.loads(RunDirectory(path).metrics.read_text())
    assert metrics["epochs_run"] < 30


@pytest.mark.parametrize("argv, message", [
    (["--model", "momix", "--level-sizes", "2", "4"], "--level-sizes gives 2 levels but the hierarchy has 4"),
    (["--model", "momix", "--exclude-labels", "cd34_filtered"], r"Level\(s\) \[1\] have fewer than 2 classes"),
    (["--label-column", "no_such_column", "--hierarchy", str(PBMC_HIERARCHY)], "'no_such_column', which the data lacks"),
    (["--levels", "level_1", "not_a_column"], "not_a_column"),
    (["--exclude-labels", "not_a_population"], "not_a_population"),
])
def test_cli_errors_name_the_problem(pbmc_slice, tmp_path, capsys, argv, message):
    code = main(["train", str(pbmc_slice), "--output", str(tmp_path / "run"), "--epochs", "1", *FAST, *argv])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_hierarchy_that_does_not_cover_the_labels_is_refused(pbmc_slice, tmp_path, capsys):
    partial = tmp_path / "partial.tsv"
    rows = PBMC_HIERARCHY.read_text().splitlines()
    partial.write_text("\n".join(r for r in rows if "memory_t" not in r and "naive_t\t" not in r) + "\n")
    code = main(["train", str(pbmc_slice), "--hierarchy", str(partial), "--output", str(tmp_path / "r"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "memory_t" in err and "naive_t" in err


def test_bad_counts_are_refused_before_training(pbmc, tmp_path, capsys):
    adata = pbmc[:200].copy()
    adata.X.data[:5] = 0.5
    path = tmp_path / "normalised.h5ad"
    adata.write_h5ad(path)
    code = main(["train", str(path), "--output", str(tmp_path / "run"), *FAST])
    assert code == 2 and "non-integer" in capsys.readouterr().err


def test_load_model_errors_are_clear(tmp_path, pbmc_slice):
    with pytest.raises(FileNotFoundError, match="No model at"):
        load_model(tmp_path / "nothing")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip archive at all")
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        scvae_hier.load_model(corrupt)
    foreign = tmp_path / "foreign.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(foreign)
    with pytest.raises(ModelFileError, match="not a scvae-hier model"):
        load_model(foreign)


def test_wrong_format_version_is_refused(tmp_path):
    import zipfile

    from scvae_hier.models import VAE
    model = VAE(5, latent_dim=2, hidden=(4,))
    model.build()
    good = tmp_path / "good.keras"
    model.save(good)
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["format_version"] = 99
                data = json.dumps(config).encode()
            target.writestr(item, data)
    assert isinstance(load_model(good), VAE)
    with pytest.raises(ModelFileError, match="format 99.*retrain"):
        load_model(old)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ModelFileError, match="corrupt"):
        load_model(truncated)


# Four models predicting two sizes each, in a fresh process: TensorFlow warns of retracing at most
# twice per process, so a test in this one could find the warnings spent by earlier tests.
SEVERAL_MODELS = (
    "import sys, numpy as np\n"
    "from scvae_hier.data import CountBatches\n"
    "from scvae_hier.models.mixture import MixtureVAE\n"
    "from scvae_hier.outputs import predict_outputs\n"
    "x = np.random.default_rng(0).poisson(2.0, size=(70, 12)).astype('float32')\n"
    "for seed in range(4):\n"
    "    model = MixtureVAE(12, n_components=3, latent_dim=2, hidden=(8,), seed=seed)\n"
    "    for n in (50, 70):  # batches of 32: a last batch of 18, then of 6\n"
    "        if sys.argv[1] == 'outputs':\n"
    "            assert predict_outputs(model, x[:n], 32)['latent'].shape == (n, 2)\n"
    "        else:\n"
    "            batches = CountBatches(x[:n], 32)\n"
    "            model.predict(batches, verbose=0)\n"
    "            batches.release()\n"
    "print('PREDICTED')\n")


@pytest.mark.parametrize("through, warns", [("outputs", False), ("keras", True)])
def test_predicting_with_several_models_does_not_warn_of_retracing(through, warns):
    """Each model traces its predict function for full batches and the shorter last one, and
    TensorFlow counts all models' traces together: from the third model on it warns of "excessive"
    retracing. predict_outputs drops that one warning; the same predictions through model.predict
    directly (the control) do warn, so the check would see it."""
    done = subprocess.run([sys.executable, "-c", SEVERAL_MODELS, through], capture_output=True, text=True,
                          timeout=300)
    assert "PREDICTED" in done.stdout, done.stderr[-2000:]
    assert ("triggered tf.function retracing" in done.stderr) == warns, done.stderr[-2000:]


@pytest.mark.parametrize("optimizer_built_early", [True, False])
def test_a_fit_traces_its_training_step_once(pbmc_slice, monkeypatch, optimizer_built_early):
    """compile_model builds the optimizer before fit: built inside the first traced step (Keras's
    default without a distribution strategy), its variables make TensorFlow trace that step a
    second time, which cost every fit 1.5x its start-up (benchmarks/fit_start.py). The control
    leaves the optimizer unbuilt and sees the second trace, so the count is able to tell."""
    if not optimizer_built_early:
        shipped = training.compile_model

        def compile_deferred(model, options, train_counts):
            shipped(model, options, train_counts)
            model.compile(optimizer=keras.optimizers.Adam(options.learning_rate), jit_compile=False)
        monkeypatch.setattr(training, "compile_model", compile_deferred)
    adata = anndata.read_h5ad(pbmc_slice)
    scvae_hier.MixtureVAE.setup_anndata(adata)
    model = scvae_hier.MixtureVAE(adata, n_genes=40, latent_dim=2, hidden=(8,), drop_empty_cells=True)
    traced = []
    step = model.module.train_step
    model.module.train_step = lambda data: traced.append(1) or step(data)
    model.train(max_epochs=2, warm_up=1, batch_size=64, xla=False, progress_bar=False)
    assert len(traced) == (1 if optimizer_built_early else 2)
