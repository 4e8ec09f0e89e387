"""Every named choice a user can make, and the functions that check them.

Kept free of TensorFlow so that the command line can list choices (`scvae-hier --help`) without
loading it; the models and laws import their names from here.
"""
import numbers

LIKELIHOOD_NAMES = ("negative_binomial", "poisson", "zero_inflated_negative_binomial", "zero_inflated_poisson")
PRIOR_LAWS = ("normal", "student-t")
PRIOR_PROBABILITIES = ("uniform", "learnable")
INPUT_TRANSFORMS = ("log1p", "none", "normalised_log1p")
LIBRARY_SIZES = ("none", "observed")
NORMALISATIONS = ("batch", "layer", "none")
DISPERSIONS = ("cell", "gene")
INFERENCE_MODES = ("exact", "scalable")
TRANSITIONS = ("learnable", "uniform")
USAGE_TARGETS = ("uniform", "prior")
COMPONENT_MEANS = ("tree", "path")
LEAF_PLACEMENTS = ("graph", "compact")
TOP_LEVEL_SPLITS = ("linkage", "compact")
INITIALISATIONS = ("random", "pca-kmeans")
OUTLIER_HANDLING = ("keep", "clip")
OUT_OF_CORE = ("auto", "on", "off")
EVALUATION_SETS = ("test", "validation", "train", "all")
MISSING_GENES = ("refuse", "zeros")  # a query without some of the model's genes: refused, or read as zero counts
DEFAULT_GROUPING_DECAY = 0.85  # TreeVAE's final refit: a level's compactness weight over its parent's (NOTES.md)
DEFAULT_TOP_LEVEL_DECAY = 0.5  # ... and in the grouping that fixes the top level's classes first (NOTES.md)
DEFAULT_TOP_LEVEL_SPLIT = "linkage"  # ... and how its placement splits the top level (NOTES.md)
DEFAULT_IWAE_SAMPLES = 100  # importance samples per cell of `evaluate` (the poster used 500)


def check_choice(what: str, value, choices) -> str:
    """Return `value` if it is one of `choices`, else raise a ValueError that lists them."""
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}.")
    return value


def check_whole(name, value, minimum=1, unit="", none_means=None):
    """Refuse a count argument that is not a whole number >= minimum (bools too; None when it
    has a meaning, given by none_means)."""
    if value is None and none_means:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        alternative = f"None ({none_means}) or " if none_means else ""
        raise ValueError(f"{name} must be {alternative}a whole number{unit}, {minimum} or more; got {value!r}.")


def check_calling_rules(unassigned_below, novelty_cutoff):
    """The thresholds that make a prediction "unassigned": a probability and a share (or None)."""
    if not 0 <= unassigned_below <= 1:
        raise ValueError(f"unassigned_below must be a probability in [0, 1], got {unassigned_below}.")
    if novelty_cutoff is not None and not 0 <= novelty_cutoff <= 1:
        raise ValueError(f"novelty_cutoff must be a share in [0, 1], got {novelty_cutoff}.")
