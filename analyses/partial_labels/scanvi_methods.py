"""The method names of scanvi.py's result rows, in one place that needs no scvi-tools, so that
against_scanvi.py (run in the package's own venv) picks the same rows scanvi.py writes."""
DEFAULT_SCVI_EPOCHS = 100
RERUN = "scanvi_rerun"  # the mask's own seed trained again (on another machine)


def method_name(scvi_epochs, seed_offset=0, default_epochs=DEFAULT_SCVI_EPOCHS):
    """'scanvi' for the default scVI length, 'scanvi_scvi<N>' otherwise; '_seed+<offset>' for another
    training seed on the same mask."""
    name = "scanvi" if scvi_epochs == default_epochs else f"scanvi_scvi{scvi_epochs}"
    return name if not seed_offset else f"{name}_seed+{seed_offset}"


def is_default_scanvi(method):
    """The default scANVI (scVI at its default length) under any training seed; not scanvi_scvi400."""
    return method == RERUN or method.split("_seed+")[0] == "scanvi"
