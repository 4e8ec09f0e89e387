"""Model registry: the names users pass to `--model`, each a module and a class.

Classes are imported on first use, so listing or checking names does not load TensorFlow; a new
model is one module plus one line here.
"""
import importlib

from ..choices import check_choice

MODELS = {
    "vae": ("vae", "VAE"),
    "mixture": ("mixture", "MixtureVAE"),
    "indmom": ("indmom", "IndMoMVAE"),
    "momix": ("momix", "MoMixVAE"),
    "tree": ("tree", "TreeVAE"),
}
_CLASS_MODULES = {cls: module for module, cls in MODELS.values()} | {"BaseVAE": "base"}


def model_class(name: str):
    """The model class for a `--model` name, with a clear error for unknown names."""
    check_choice("model", name, tuple(MODELS))
    module, cls = MODELS[name]
    from .. import _tensorflow  # noqa: F401
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def register_all() -> None:
    """Import every model module, which registers its classes with Keras (needed to load a file)."""
    for name in MODELS:
        model_class(name)


def __getattr__(name):  # `from scvae_hier.models import MixtureVAE` keeps working, lazily
    if name in _CLASS_MODULES:
        from .. import _tensorflow  # noqa: F401
        return getattr(importlib.import_module(f".{_CLASS_MODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
