"""Bad input and faults: each row of the README's "Bad input and faults" table is a test here.
Every message must name the problem and the fix; nothing is silently wrong and no file is lost."""
import json
import re
import shutil
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import scvae_hier as sh
from scvae_hier import training
from scvae_hier.cli import main
from scvae_hier.data import DataError, OutlierCountWarning, prepare
from scvae_hier.options import TrainOptions
from scvae_hier.runs import RunDirectory

from conftest import FAST, PBMC_HIERARCHY

TINY_RUN = ["--epochs", "2", "--warm-up", "1", "--model", "vae", *FAST]


def train_cli(data, out, *argv):
    return main(["train", str(data), "--output", str(out), *argv])


def write(adata, path):
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], r"--batch-size must be at least 1; got 0"),
    (["--n-genes", "-5"], r"--n-genes must be at least 0; got -5"),
    (["--epochs", "0"], r"--epochs must be at least 1; got 0"),
    (["--learning-rate", "-0.1"], r"--learning-rate must be at least 0.0"),
    (["--hidden", "16", "0"], r"--hidden must be at least 1"),
    (["--split", "0.5", "0.5", "0.5"], r"--split needs three fractions .* sum to 1"),
    (["--folds", "1"], r"--folds must be 0 \(use --split\) or at least 2"),
    (["--folds", "5", "--fold", "5"], r"--fold must be in 0..4"),
    (["--n-components", "1"], r"--n-components must be at least 2"),
])
def test_numeric_options_are_checked_before_anything_is_written(pbmc_slice, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert train_cli(pbmc_slice, out, *argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # refused before a folder was made
    with pytest.raises(ValueError, match=message.split(";")[0]):  # the Python API checks the same way
        TrainOptions(**_as_kwargs(argv))


def _as_kwargs(argv):
    values, name = {}, None
    for token in argv:
        if token.startswith("--"):
            name = token[2:].replace("-", "_")
            values[name] = []
        else:
            values[name].append(float(token) if "." in token else int(token))
    return {k: (tuple(v) if k in ("hidden", "split") else v[0]) for k, v in values.items()}


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(pbmc_slice, tmp_path, capsys):
    folder = tmp_path / "my_results"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    assert train_cli(pbmc_slice, folder, "--overwrite", *TINY_RUN) == 2
    assert "not a scvae-hier run" in capsys.readouterr().err and (folder / "notes.txt").read_text() == "precious"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert train_cli(pbmc_slice, a_file, *TINY_RUN) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "x"


@pytest.fixture(scope="module")
def tiny_run(pbmc_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    assert train_cli(pbmc_slice, out, *TINY_RUN) == 0
    return out


def test_resume_refuses_changes_and_applies_more_epochs(pbmc_slice, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert (run / ".scvae-hier-run").is_file()  # the marker that allows --overwrite
    assert train_cli(pbmc_slice, run, "--resume", "--latent-dim", "7") == 2
    assert re.search(r"--latent-dim 7 \(the run has 4\).*another --output", capsys.readouterr().err)
    assert train_cli(pbmc_slice, run, "--resume", "--epochs", "3") == 0
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["epochs"] == 3 and config["resumed_with"] == [{"epochs": 3}]
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3
    assert "Resuming with --epochs 3" in capsys.readouterr().out


def test_damaged_checkpoint_is_named_with_the_fix(pbmc_slice, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    last = RunDirectory(run).checkpoint_model
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk
    assert train_cli(pbmc_slice, run, "--resume", "--epochs", "3") == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "damaged" in err and "--overwrite" in err


def test_ctrl_c_says_how_to_resume(pbmc_slice, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "fit", interrupted)
    out = tmp_path / "run"
    assert train_cli(pbmc_slice, out, *TINY_RUN) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"scvae-hier train: interrupted. Continue it with: scvae-hier train {pbmc_slice} --output {out} --resume"
    assert "Traceback" not in "\n".join(err)


def test_evaluate_refuses_a_changed_training_file_unless_cells_match_by_name(pbmc_slice, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    changed = tmp_path / "changed.h5ad"
    config["options"]["data"] = str(changed)
    (run / "config.json").write_text(json.dumps(config))
    adata = anndata.read_h5ad(pbmc_slice)
    write(adata[10:].copy(), changed)  # some of the run's cells are gone
    assert main(["evaluate", str(run), "--iwae-samples", "2"]) == 2
    assert re.search(r"changed since the run was trained.*not in it by name.*--set all", capsys.readouterr().err)
    write(adata[::-1].copy(), changed)  # every cell still there, in another order: matched by name
    assert main(["evaluate", str(run), "--iwae-samples", "2"]) == 0
    assert "matched by name" in capsys.readouterr().out
    bounds = json.loads((run / "evaluation" / "test" / "bounds.json").read_text())
    assert bounds["n_cells"] == config["split_counts"]["test"]


def test_tiny_inputs_are_refused_with_the_numbers(pbmc_slice, tmp_path, capsys):
    adata = anndata.read_h5ad(pbmc_slice)
    five = write(adata[:5].copy(), tmp_path / "five.h5ad")
    assert train_cli(five, tmp_path / "a", *TINY_RUN[:-len(FAST)], "--n-genes", "80") == 2
    assert "needs at least 20 cells; there are 5. Keep all genes with --n-genes 0" in capsys.readouterr().err
    assert train_cli(five, tmp_path / "b", "--epochs", "1", "--n-genes", "0", "--drop-empty-cells") == 2
    assert re.search(r"\d training cells are too few .* Use more cells", capsys.readouterr().err)
    forty = write(adata[::15].copy(), tmp_path / "forty.h5ad")
    assert train_cli(forty, tmp_path / "c", "--n-components", "50", "--split", "0.5", "0.25", "0.25",
                     "--drop-empty-cells", *FAST, "--n-genes", "0") == 2
    assert re.search(r"too few for 50 mixture components: at least 150 .* fewer components", capsys.readouterr().err)
    assert train_cli(forty, tmp_path / "d", "--drop-empty-cells", *FAST, "--n-genes", "0") == 2  # 10%: 4 cells
    assert re.search(r"leaves \d validation cell\(s\) of \d+; at least 10", capsys.readouterr().err)


def test_duplicate_names_are_refused_with_the_fix(pbmc_slice, tmp_path, capsys):
    adata = anndata.read_h5ad(pbmc_slice)
    names = adata.obs_names.to_numpy().copy()
    names[1] = names[0]
    adata.obs_names = names
    assert train_cli(write(adata, tmp_path / "dup.h5ad"), tmp_path / "r", *TINY_RUN) == 2
    assert "1 cell names occur more than once" in capsys.readouterr().err
    genes = anndata.read_h5ad(pbmc_slice)
    genes.var_names = np.where(np.arange(genes.n_vars) == 1, genes.var_names[0], genes.var_names)
    with pytest.raises(DataError, match=r"gene names occur more than once.*var_names_make_unique"):
        prepare(genes)


def test_missing_labels_are_named_and_can_be_excluded(pbmc_slice, tmp_path, capsys):
    adata = anndata.read_h5ad(pbmc_slice)
    labels = adata.obs["source_library"].astype(object)
    labels.iloc[:7] = np.nan
    adata.obs["source_library"] = labels.astype("category")
    path = write(adata, tmp_path / "nan.h5ad")
    assert train_cli(path, tmp_path / "r1", *TINY_RUN) == 2
    assert re.search(r"'nan' \(7 cells\).*--exclude-labels nan", capsys.readouterr().err)
    assert train_cli(path, tmp_path / "r2", "--exclude-labels", "nan", *TINY_RUN) == 0
    assert json.loads((tmp_path / "r2" / "config.json").read_text())["n_cells"] <= 600 - 7


def test_hierarchy_for_another_label_column_is_usable_as_suggested(pbmc_slice, tmp_path, capsys):
    adata = anndata.read_h5ad(pbmc_slice)
    adata.obs = adata.obs.rename(columns={"source_library": "population"})
    del adata.uns["hierarchy"]
    path = write(adata, tmp_path / "renamed.h5ad")
    assert train_cli(path, tmp_path / "r1", "--hierarchy", str(PBMC_HIERARCHY), *TINY_RUN) == 2
    assert "Pass --label-column" in capsys.readouterr().err
    assert train_cli(path, tmp_path / "r2", "--hierarchy", str(PBMC_HIERARCHY), "--label-column", "population",
                     *TINY_RUN) == 0


def test_outlier_counts_are_reported_and_can_be_clipped(pbmc_slice):
    adata = anndata.read_h5ad(pbmc_slice)
    X = adata.X.tolil()
    X[3, 5] = 1e6
    adata.X = sp.csr_matrix(X)
    gene = adata.var_names[5]
    with pytest.warns(OutlierCountWarning, match=rf"1 count\(s\) lie far above.*{re.escape(gene)}.*1e\+06.*--outlier-counts clip"):
        kept = prepare(adata, n_genes=0)
    assert kept.X[3, list(kept.var_names).index(gene)] == 1e6
    with pytest.warns(OutlierCountWarning, match="clipped"):
        clipped = prepare(adata, n_genes=0, outlier_counts="clip")
    assert clipped.X[3, list(clipped.var_names).index(gene)] < 1e6
    assert clipped.uns["preprocessing"]["n_outlier_counts"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlierCountWarning)
        prepare(anndata.read_h5ad(pbmc_slice), n_genes=0)  # the real cells have none


def test_api_input_errors(pbmc_slice):
    adata = anndata.read_h5ad(pbmc_slice)
    sh.MixtureVAE.setup_anndata(adata)
    with pytest.raises(ValueError, match="--epochs must be at least 1"):
        sh.MixtureVAE(adata, n_genes=50, drop_empty_cells=True).train(max_epochs=0)
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        sh.MixtureVAE(adata, n_genes=50, drop_empty_cells=True).train(batch_size=0)


# -- found by probing as a new user (issue 15's second round) ----------------------------------

def test_overwrite_refuses_a_run_folder_holding_the_users_files(pbmc_slice, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "my_notes.txt").write_text("precious")
    assert train_cli(pbmc_slice, run, "--overwrite", *TINY_RUN) == 2
    assert "my_notes.txt" in capsys.readouterr().err and (run / "my_notes.txt").read_text() == "precious"
    (run / "my_notes.txt").unlink()
    assert train_cli(pbmc_slice, run, "--overwrite", *TINY_RUN) == 0
    assert f"Replacing the run in {run}" in capsys.readouterr().out


def test_refused_input_leaves_no_folder_behind(pbmc_slice, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(pbmc_slice, out, "--exclude-labels", "no_such_population", *TINY_RUN) == 2
    assert not out.exists()
    assert train_cli(pbmc_slice, out, "--hierarchy", str(PBMC_HIERARCHY), "--levels", "level_1", "level_2",
                     *TINY_RUN) == 2
    assert "not both" in capsys.readouterr().err and not out.exists()


def test_diverging_training_is_stopped_and_not_saved_as_finished(pbmc_slice, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(pbmc_slice, out, *TINY_RUN, "--learning-rate", "1e9", "--model", "mixture") == 2
    assert re.search(r"Training diverged in epoch \d \(loss nan\).*Lower --learning-rate", capsys.readouterr().err)
    assert not RunDirectory(out).is_finished()


def test_evaluate_and_analyse_options_are_checked(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["evaluate", str(run), "--iwae-samples", "0"]) == 2
    assert "--iwae-samples and --batch-size must be at least 1" in capsys.readouterr().err
    assert main(["analyse", str(run), "--level", "level_9"]) == 2
    assert "--level level_9 chooses the level of a comparison" in capsys.readouterr().err


def test_run_folder_mixing_two_runs_is_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    config["options"]["model"] = "momix"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds a VAE but the run's config.json says --model momix"):
        sh.load_model(run)


def test_batch_key_of_real_numbers_is_refused(pbmc_slice, tmp_path, capsys):
    adata = anndata.read_h5ad(pbmc_slice)
    adata.obs["depth"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)
    path = write(adata, tmp_path / "depth.h5ad")
    assert train_cli(path, tmp_path / "r", "--batch-key", "depth", *TINY_RUN) == 2
    assert re.search(r"obs\['depth'\] holds real numbers .* not batch categories", capsys.readouterr().err)


def test_sample_and_save_arguments_are_checked(tiny_run, tmp_path):
    model = sh.load(tiny_run)
    for bad in (2.5, -3):
        with pytest.raises(ValueError, match="n must be a whole number of cells"):
            model.sample(n=bad)
    with pytest.raises(ValueError, match="seed must be an integer"):
        model.sample(n=2, seed="abc")
    with pytest.raises(ValueError, match="without a batch covariate"):
        model.sample(n=2, batch="x")
    a_file = tmp_path / "afile.txt"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file; save needs a folder"):
        model.save(a_file)
    with pytest.raises(TypeError, match="adata must be an AnnData"):
        model.get_latent_representation(np.zeros((3, 3)))


def test_files_of_the_wrong_kind_are_named(pbmc_slice, tmp_path):
    h5 = tmp_path / "cells.h5"
    shutil.copy(pbmc_slice, h5)
    with pytest.raises(DataError, match=r"AnnData \(.h5ad\) file with an .h5 suffix.*rename it to .h5ad"):
        training.read_counts(h5)
    with pytest.raises(ValueError, match="is a data file, not a model"):
        sh.load(pbmc_slice)


def test_option_types_and_hierarchy_folders_are_named(tmp_path):
    with pytest.raises(ValueError, match="--latent-dim must be a number; got '3'"):
        TrainOptions(latent_dim="3")
    with pytest.raises(ValueError, match="is a folder; the hierarchy must be a .tsv"):
        training.Hierarchy.from_file(tmp_path)
