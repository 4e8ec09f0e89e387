"""Run folders: where a trained model, its configuration, history and per-cell outputs live,
and `load_model`, which reads a model back with clear errors for missing, corrupt or
wrong-version files."""
from . import _tensorflow  # noqa: F401  (quiet TensorFlow start-up on CPU-only machines)
import json
import zipfile
from pathlib import Path

import keras

from .files import atomic_path, write_json  # noqa: F401  (write_json: run files)
from .models import register_all
from .models.base import FORMAT_VERSION


class ModelFileError(ValueError):
    """A model file that cannot be read into this version of scvae-hier."""


class RunDirectory:
    """Names of everything a run writes, in one place."""

    def __init__(self, path):
        self.path = Path(path)

    model = property(lambda self: self.path / "model.keras")
    config = property(lambda self: self.path / "config.json")
    history = property(lambda self: self.path / "history.csv")
    split = property(lambda self: self.path / "split.csv")
    labels = property(lambda self: self.path / "labels.csv")  # the labels a semi-supervised run was given
    outputs = property(lambda self: self.path / "outputs.h5ad")
    metrics = property(lambda self: self.path / "metrics.json")
    checkpoint_dir = property(lambda self: self.path / "checkpoint")
    checkpoint_model = property(lambda self: self.path / "checkpoint" / "last.keras")
    checkpoint_best = property(lambda self: self.path / "checkpoint" / "best.weights.h5")
    checkpoint_state = property(lambda self: self.path / "checkpoint" / "state.json")
    marker = property(lambda self: self.path / ".scvae-hier-run")  # written first: "this folder is a run"
    figures = property(lambda self: self.path / "figures")
    report = property(lambda self: self.path / "report.md")

    def evaluation(self, name="test") -> Path:
        """Folder of `scvae-hier evaluate` on one set of cells (test, validation, ..., <file>-all)."""
        return self.path / "evaluation" / name

    def is_ours(self) -> bool:
        """A run folder of scvae-hier: it has the marker (or, written before 0.2, a run config)."""
        if self.marker.exists():
            return True
        try:
            return "options" in json.loads(self.config.read_text())
        except (OSError, ValueError):
            return False

    def is_finished(self) -> bool:
        return self.model.exists() and self.outputs.exists()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_model.exists() and self.checkpoint_state.exists()

    def read_config(self) -> dict:
        if not self.config.exists():
            raise FileNotFoundError(f"{self.path} is not a scvae-hier run folder (no config.json).")
        return json.loads(self.config.read_text())


def save_model_atomically(model, path):
    with atomic_path(path) as tmp:
        model.save(tmp)


def save_weights_atomically(model, path):
    with atomic_path(path) as tmp:  # still ends in .weights.h5, as Keras requires
        model.save_weights(tmp)


def _check_model_file(path: Path):
    """Read the model's config from the .keras archive and check it before Keras does."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as error:
        if path.suffix.lower() in (".h5ad", ".h5", ".loom", ".mtx", ".csv"):
            raise ModelFileError(f"{path} is a data file, not a model: pass a run folder, a folder written by "
                                 f"model.save(), or a .keras file.") from None
        raise ModelFileError(
            f"{path} is not a readable .keras model file ({error}). It may be truncated or corrupt: "
            f"retrain, or resume the run from its checkpoint with `scvae-hier train ... --resume`.") from None
    inner = config.get("config", {})
    version = inner.get("format_version")
    if not str(config.get("registered_name") or "").startswith("scvae_hier>"):
        raise ModelFileError(f"{path} holds a {config.get('class_name')!r} model, not a scvae-hier model.")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was saved in scvae-hier model format {version} (package {inner.get('package_version')}); "
            f"this installation reads format {FORMAT_VERSION}. Install the scvae-hier version that wrote it, "
            f"or retrain the model with this one.")


def load_checkpoint(path):
    """A training checkpoint (model and optimizer state) written by this installation."""
    path = Path(path)
    fix = (f"The checkpoint {path} is damaged (e.g. the disk filled up while it was written), so the run cannot "
           f"resume from it; start it again with --overwrite.")
    try:
        _check_model_file(path)
    except ModelFileError as error:
        raise ModelFileError(f"{fix} ({error})") from None
    register_all()
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for damaged archives
        raise ModelFileError(f"{fix} ({type(error).__name__}: {error})") from None


def load_model(run_or_file):
    """Load a trained model from a run folder or a `.keras` file."""
    path = Path(run_or_file)
    if path.is_dir():
        path = RunDirectory(path).model
    if not path.exists():
        hint = (" This run folder has no final model: if training was interrupted, continue it with "
                "`scvae-hier train DATA --output RUN --resume`." if RunDirectory(path.parent).config.exists() else "")
        raise FileNotFoundError(f"No model at {path}: pass a run folder written by `scvae-hier train` "
                                f"or its model.keras file.{hint}")
    _check_model_file(path)
    config = RunDirectory(path.parent).config
    if path.name == "model.keras" and config.exists():  # a run folder: its config must describe this model
        expected = json.loads(config.read_text()).get("options", {}).get("model")
        inner = json.loads(zipfile.ZipFile(path).read("config.json"))
        from .models import MODELS
        found = next((n for n, (_, c) in MODELS.items() if c == inner.get("class_name")), None)
        if expected and found and expected != found:
            raise ModelFileError(f"{path} holds a {inner.get('class_name')} but the run's config.json says --model "
                                 f"{expected}: the folder mixes two runs. Use the run's own model.keras.")
    try:
        register_all()
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for damaged archives
        raise ModelFileError(f"Could not load {path}: {error}. Retrain, or resume the run from its checkpoint.") from error
