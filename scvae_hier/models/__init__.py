"""Model registry: the names users pass to `--model`."""
from .base import BaseVAE
from .indmom import IndMoMVAE
from .mixture import MixtureVAE
from .momix import MoMixVAE
from .vae import VAE

MODELS = {"vae": VAE, "mixture": MixtureVAE, "indmom": IndMoMVAE, "momix": MoMixVAE}


def model_class(name: str):
    """The model class for a `--model` name, with a clear error for unknown names."""
    if name in MODELS:
        return MODELS[name]
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")


__all__ = ["BaseVAE", "IndMoMVAE", "MixtureVAE", "MoMixVAE", "VAE", "MODELS", "model_class"]
