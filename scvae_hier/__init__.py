"""scvae-hier: VAEs for single-cell counts whose latent priors follow the cell-type hierarchy."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"


def load_model(run_or_file):
    """Load a trained model from a run folder or a `.keras` file (see `scvae_hier.runs`)."""
    from .runs import load_model as _load

    return _load(run_or_file)
