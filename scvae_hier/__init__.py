"""scvae-hier: VAEs for single-cell counts whose latent priors follow the cell-type hierarchy.

    import scvae_hier as sh
    sh.MoMixVAE.setup_anndata(adata, layer="counts", levels=["level_1", "level_2"])
    model = sh.MoMixVAE(adata); model.train()

The model classes (`sh.VAE`, `sh.MixtureVAE`, `sh.IndMoMVAE`, `sh.MoMixVAE`), `sh.load` and
`sh.pl` are imported on first use, so `import scvae_hier` does not load TensorFlow.
"""
import importlib
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.2.0"

_API = {"VAE", "MixtureVAE", "IndMoMVAE", "MoMixVAE", "TreeVAE", "load", "HierarchyModel"}
__all__ = sorted(_API | {"pl", "load_model", "prepare_query_anndata", "__version__"})


def load_model(run_or_file):
    """The Keras model of a run folder or `.keras` file (see `sh.load` for the AnnData API)."""
    from .runs import load_model as _load

    return _load(run_or_file)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name == "prepare_query_anndata":
        return importlib.import_module(".annotation", __name__).prepare_query_anndata
    if name == "pl":
        return importlib.import_module(".pl", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
