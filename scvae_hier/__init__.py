"""scvae-hier: VAEs for single-cell counts whose latent priors follow the cell-type hierarchy."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
