"""Every training option in one place: defaults, help text and choices.

The command line is generated from this dataclass, and a run's config.json stores it, so an
option documented here is an option the CLI has and a run remembers.
"""
import numbers
from dataclasses import asdict, dataclass, field, fields

from .choices import (COMPONENT_MEANS, DEFAULT_GROUPING_DECAY, DEFAULT_TOP_LEVEL_DECAY, DEFAULT_TOP_LEVEL_SPLIT,
                      DISPERSIONS, INFERENCE_MODES,
                      INITIALISATIONS, INPUT_TRANSFORMS, LEAF_PLACEMENTS, LIBRARY_SIZES, LIKELIHOOD_NAMES,
                      NORMALISATIONS, OUT_OF_CORE, OUTLIER_HANDLING, PRIOR_LAWS, PRIOR_PROBABILITIES, TOP_LEVEL_SPLITS,
                      TRANSITIONS, USAGE_TARGETS)
from .markers import parse as parse_markers
from .models import MODELS


# Maximum epochs, and for TreeVAE with labels (early stopping on the validation ELBO ends a run
# sooner: semi-supervised PBMC runs stopped at epochs 140-200). IndMoMVAE with labels lost 0.05 ARI
# at level 3 from 60 to 200 epochs, so the other models keep the default.
DEFAULT_EPOCHS, SEMI_SUPERVISED_TREE_EPOCHS = 100, 200


def option(default, help, choices=None, **extra):
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


@dataclass
class TrainOptions:
    data: str = option(None, "Count data: .h5ad, .loom, 10x .h5, or a 10x matrix folder.", positional=True)
    model: str = option("mixture", "Model to train.", sorted(MODELS))
    output: str = option(None, "Run folder (default: runs/<data>-<model>-<prior>-s<seed>).")
    layer: str = option(None, "Read counts from this AnnData layer instead of X (e.g. counts).")
    n_genes: int = option(500, "Highly variable genes to keep (scanpy seurat_v3 on counts); 0 keeps all genes.")
    label_column: str = option(None, "obs column with cell-type labels (default: the hierarchy's label column).")
    hierarchy: str = option(None, "Hierarchy file (TSV/JSON/YAML); default: the data's uns['hierarchy'] if any.")
    levels: tuple = option(None, "Per-level obs columns (coarse to fine) defining the hierarchy instead of a file.",
                          nargs="+")
    exclude_labels: tuple = option((), "Drop cells with these labels (e.g. cd14_monocytes for the poster's nine).",
                                  nargs="+")
    drop_empty_cells: bool = option(False, "Drop cells with no counts on the selected genes instead of failing.")
    outlier_counts: str = option("keep", "Counts over 20x their gene's 99th percentile (and over 1000) are always "
                                 "reported; keep them, or clip them to that bound.", list(OUTLIER_HANDLING))
    n_components: int = option(None, "Mixture components (default: the number of finest-level classes).")
    level_sizes: tuple = option(None, "Components per level for indmom/momix (default: the hierarchy's class "
                                "counts; more than classes is allowed).", nargs="+", type=int)
    inference: str = option("scalable", "MoMixVAE inference: exact (all paths decoded) or scalable (one decode).",
                            list(INFERENCE_MODES))
    transitions: str = option("learnable", "MoMixVAE transitions p(y_l|y_<l): learnable or fixed uniform.",
                              list(TRANSITIONS))
    marginal_usage: float = option(1.0, "Weight of the marginal-usage KL (hierarchical models); constant for the "
                                   "first half of --epochs, then cosine-annealed to 10%%.")
    usage_target: str = option("uniform", "Target of the marginal-usage KL: uniform, or the model's own p(y_l) "
                               "(the poster's; it collapses with a learnable prior).", list(USAGE_TARGETS))
    component_means: str = option("tree", "MoMixVAE component locations: tree (a sum of per-level class offsets, "
                                  "halved per level, so coarse classes are latent regions) or path (one free "
                                  "location per path, the poster's).", list(COMPONENT_MEANS))
    init: str = option("random", "Prior initialisation: random, or pca-kmeans (k-means on a PCA of "
                       "log-normalised counts; it lowered clustering on synthetic data but raised level-4 ARI on "
                       "PBMC validation cells, see analyses/tuning/NOTES.md).", list(INITIALISATIONS))
    prior: str = option("normal", "Law of the prior components p(z|y).", list(PRIOR_LAWS))
    prior_probabilities: str = option(None, "p(y): fixed uniform or learned (default: learnable for --model tree, "
                                      "whose refit fits the classes' proportions, uniform for the others).",
                                      list(PRIOR_PROBABILITIES))
    likelihood: str = option("negative_binomial", "Count likelihood p(x|z).", sorted(LIKELIHOOD_NAMES))
    latent_dim: int = option(20, "Dimension of the latent z.")
    hidden: tuple = option((100, 100), "Hidden layer sizes of encoders (decoder mirrors them).", nargs="+", type=int)
    normalisation: str = option("batch", "Normalisation after each hidden layer (scVAE uses batch).",
                                list(NORMALISATIONS))
    input_transform: str = option("none", "Transform of counts fed to the encoders (none: raw counts, as scVAE; "
                                  "better clustering and bound than log1p here).", list(INPUT_TRANSFORMS))
    library_size: str = option("none", "Sequencing depth in the count law: none (the decoder predicts each gene's "
                               "mean from z alone, scVAE's), or observed (it predicts gene proportions, scaled by "
                               "the cell's total count, scVI's size factor).", list(LIBRARY_SIZES))
    batch_key: str = option(None, "obs column of a batch covariate (e.g. source_dataset): its one-hot value is "
                            "appended to the encoder and decoder inputs, so clusters need not follow batches.")
    encode_covariates: bool = option(True, "Give the batch covariate to the encoder as well as the decoder "
                                     "(--no-encode-covariates: the decoder only, scVI's default).")
    dispersion: str = option("cell", "Negative-binomial dispersion r: cell (a decoder output per cell and gene, "
                             "scVAE's) or gene (one learned r per gene, scVI's; the lgamma terms are then "
                             "computed once per cell instead of once per cluster or path).", list(DISPERSIONS))
    usage_level_weights: tuple = option(None, "Per-level multipliers of the marginal-usage KL (coarse to fine; "
                                        "default 1 each): small at coarse levels lets unbalanced classes be "
                                        "unbalanced, large at fine levels fights collapse.", nargs="+", type=float)
    # -- TreeVAE options
    components_per_leaf: int = option(1, "TreeVAE: prior components per finest-level class (more than one lets a "
                                      "leaf be a union of latent clusters; its posterior is their sum).")
    reseed_epochs: tuple = option((5,), "TreeVAE: at the start of these epochs (counted from 0; none or 0 = never), "
                                  "set the components from a clustering of the training cells' latent means, "
                                  "grouped into the hierarchy's leaves so that its classes are compact.",
                                  nargs="*", type=int)
    reseed_clusters: int = option(None, "TreeVAE: k-means clusters per leaf when re-seeding; they are grouped into "
                                  "leaves by the hierarchy's shape (more than one lets a split type be rejoined; "
                                  "default 4 without labels, 2 with them).")
    final_refit: int = option(10, "TreeVAE: after training, re-seed the components once more from the trained "
                              "encoder's latent and run this many EM steps on the prior terms (0 = off).")
    final_refit_clusters: int = option(None, "TreeVAE: k-means clusters per leaf for the final refit's re-seeding "
                                       "(default 4 without labels: the trained latent separates small types; "
                                       "the re-seed's count when trained with labels).")
    leaf_placement: str = option("graph", "TreeVAE: how the re-seeds place the leaves in the tree: "
                                 "'graph', the top level's classes compact and every class below it a "
                                 "well-connected region of the latent's 15-nearest-neighbour graph; 'compact', "
                                 "every level compact (least sum of squares; the rule before 2026-12-02, and the only one with "
                                 "labels before this version). With labels, only the leaves the labels leave free move.",
                                 list(LEAF_PLACEMENTS))
    grouping_decay: float = option(DEFAULT_GROUPING_DECAY, "TreeVAE: when the final refit groups k-means clusters into "
                                   "the tree's leaves, level l's compactness counts DECAY^(l-1), so coarse levels "
                                   "come first, kept if the leaves stay within 1.2x as compact as with every level "
                                   "alike (1 = every level alike, the rule before 2026-12-02).")
    top_level_decay: float = option(DEFAULT_TOP_LEVEL_DECAY, "TreeVAE: in that coarse-first grouping, "
                                    "each k-means cluster's top-level class is fixed first by a grouping where level "
                                    "l counts DECAY^(l-1); the levels below follow --grouping-decay inside those "
                                    "classes (1 = no such first step, the rule of the second change of 2026-12-02).")
    top_level_split: str = option(DEFAULT_TOP_LEVEL_SPLIT, "TreeVAE: how the final refit's graph placement splits the top level: "
                                  "'linkage', its classes as far apart as possible by average linkage (the mean "
                                  "distance between their cells, which a class's size does not sway), none of them a "
                                  "fragment (under a quarter of its even share of the cells), nor any class "
                                  "below it where avoidable (under 5%% of its even share); 'compact', "
                                  "least sum of squares (the rule before 2026-12-03, which sets the biggest distinct "
                                  "type apart). The epoch re-seeds always use 'compact'.", list(TOP_LEVEL_SPLITS))
    empty_leaves: tuple = option((), "TreeVAE: leaves of the hierarchy (finest class names) that the "
                                 "final clustering leaves empty: types absent from the data, or too rare to find "
                                 "without labels (e.g. Kang's 0.8%% megakaryocytes); otherwise every leaf takes "
                                 "a piece of some other type.", nargs="+")
    markers: tuple = option((), "TreeVAE: marker genes of classes, as CLASS=GENE,GENE (a class name "
                            "at any level, e.g. 'CD8 T=CD8A,CD8B'); the final refit places the leaves so that each "
                            "marked class holds, of the leaves under its nearest ancestor with more leaves, those "
                            "where the markers are highest (with labels, among the leaves the labels leave free). Marker genes "
                            "are kept among the model's genes.",
                            nargs="+")
    # -- partial labels (semi-supervised models)
    semi_supervised: bool = option(False, "Train with the cells' labels where they have them (tree, mixture, indmom, "
                                   "momix): a cell may be labelled at any level or none (NaN, empty or "
                                   "--unlabelled-category); components are the hierarchy's classes, in its order.")
    labelled: tuple = option((), "Experiments: hide every label except a seeded share of cells per level, as "
                             "LEVEL=FRACTION (level name or number; e.g. level_4=0.01 level_2=0.1), stratified by "
                             "the finest class; implies --semi-supervised.", nargs="+")
    hide_labels: tuple = option((), "Experiments: cells with these labels are never labelled and their classes are "
                                "left out of the model's hierarchy (a type the reference lacks).", nargs="+")
    unlabelled_category: str = option("Unknown", "Label value meaning 'not labelled' (besides NaN and empty).")
    label_weight: float = option(5.0, "Semi-supervised: weight of the mean -log q(label|x) over labelled cells "
                                 "against the mean ELBO per cell (scANVI's classification ratio is 50; 1-20 scored "
                                 "alike on validation cells here, 50 and 500 lower: analyses/partial_labels/NOTES.md).")
    novel_classes: int = option(0, "Semi-supervised TreeVAE: extra leaves, under an 'unassigned' class at every "
                                "level, for cell types nobody labelled.")
    batch_size: int = option(128, "Minibatch size.")
    learning_rate: float = option(1e-3, "Adam learning rate.")
    epochs: int = option(None, f"Maximum number of epochs (default {DEFAULT_EPOCHS}, or {SEMI_SUPERVISED_TREE_EPOCHS} for "
                         "TreeVAE with labels: it still gained at levels 3-4 after 100 epochs on validation "
                         "cells, analyses/partial_labels/NOTES.md; early stopping ends runs sooner).")
    warm_up: int = option(5, "KL warm-up epochs: the KL weight grows linearly from 0 to 1.")
    patience: int = option(20, "Stop after this many epochs without a better validation ELBO.")
    split: tuple = option((0.8, 0.1, 0.1), "Train, validation, test fractions.", nargs=3, type=float)
    folds: int = option(0, "Cross-validation: split the cells into this many folds (by --seed) and test on "
                        "--fold; validation cells (--split's validation fraction of all cells) come from the "
                        "other folds. 0 uses --split.")
    fold: int = option(0, "The test fold, 0 to --folds - 1.")
    seed: int = option(0, "Random seed (split, weights, noise, batch order).")
    xla: bool = option(True, "Compile train/predict steps with XLA (measured faster for the mixture models).")
    devices: int = option(1, "Train on this many devices with tf.distribute.MirroredStrategy: GPUs when present, "
                          "else the CPU split into logical devices (for testing; no faster). Each device takes "
                          "--batch-size / devices cells of every batch.")
    out_of_core: str = option("auto", "Read an .h5ad in chunks and train from an on-disk copy of the chosen genes "
                              "(run folder's counts/), for data larger than memory: on, off, or auto (on above "
                              "250 million stored counts). Same genes, batches and results as in memory.",
                              list(OUT_OF_CORE))
    resume: bool = option(False, "Continue an interrupted run in --output from its last checkpoint.")
    overwrite: bool = option(False, "Replace an existing run folder.")

    def __post_init__(self):
        for f in fields(self):   # a single value where a list is meant (Python API): a list of one,
            value = getattr(self, f.name)   # not a string read as its characters
            if f.type is tuple and isinstance(value, (str, numbers.Number)):
                setattr(self, f.name, (value,))
        if self.prior_probabilities is None:  # each model's best setting (analyses/tuning/tree/NOTES.md)
            self.prior_probabilities = "learnable" if self.model == "tree" else "uniform"
        if self.labelled or self.hide_labels:  # experiments on partial labels train semi-supervised
            self.semi_supervised = True
        if self.epochs is None:
            tree_with_labels = self.semi_supervised and self.model == "tree"
            self.epochs = SEMI_SUPERVISED_TREE_EPOCHS if tree_with_labels else DEFAULT_EPOCHS
        check_ranges(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Smallest allowed value of each numeric option (None: the option may be left unset). Checked
# where options enter, for the command line and the Python API alike.
# Options that only TreeVAE's final refit reads (`scvae-hier refit` changes them on a trained run;
# experiment entries that differ in nothing else share their training).
REFIT_OPTIONS = ("final_refit", "final_refit_clusters", "grouping_decay", "top_level_decay", "empty_leaves",
                 "markers", "top_level_split")
MINIMUMS = {"n_genes": 0, "n_components": 2, "level_sizes": 2, "marginal_usage": 0.0, "usage_level_weights": 0.0,
            "latent_dim": 1, "hidden": 1, "batch_size": 1, "learning_rate": 0.0, "epochs": 1, "warm_up": 0,
            "patience": 1, "devices": 1, "split": 0.0, "folds": 0, "fold": 0, "seed": 0, "components_per_leaf": 1,
            "reseed_clusters": 1, "final_refit": 0, "final_refit_clusters": 1, "reseed_epochs": 0, "label_weight": 0.0, "novel_classes": 0}


def check_ranges(options) -> None:
    """Refuse numeric options outside their range, naming the option, the value and the bound."""
    for name, minimum in MINIMUMS.items():
        value = getattr(options, name, None)
        if value is None:
            continue
        values = list(value) if isinstance(value, (tuple, list)) else [value]
        flag = "--" + name.replace("_", "-")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
            raise ValueError(f"{flag} must be a number; got {value!r}.")
        bad = [v for v in values if v < minimum]
        if bad:
            bound = f"at least {minimum}"
            raise ValueError(f"{flag} must be {bound}; got {value!r}.")
    if len(tuple(options.split)) != 3 or abs(sum(options.split) - 1.0) > 1e-6:
        raise ValueError(f"--split needs three fractions (train, validation, test) that sum to 1; got {options.split!r}.")
    if (options.semi_supervised or options.labelled or options.hide_labels) and options.model == "vae":
        raise ValueError("Partial labels (--semi-supervised, --labelled, --hide-labels) need a model with clusters "
                         "to name: --model tree, mixture, indmom or momix; the plain vae has none.")
    if options.novel_classes and options.model != "tree":
        raise ValueError(f"--novel-classes is a TreeVAE option (an 'unassigned' branch of the tree); with "
                         f"--model mixture use --n-components above the number of finest classes; got --model "
                         f"{options.model}.")
    if options.empty_leaves and options.model != "tree":
        raise ValueError(f"--empty-leaves is a TreeVAE option (leaves of its tree left without cells); got --model "
                         f"{options.model}. Use --model tree, or --exclude-labels to drop cells of a type.")
    if options.markers:
        if options.model != "tree":
            raise ValueError(f"--markers is a TreeVAE option (marker genes place its leaves in the tree); got --model "
                             f"{options.model}. Use --model tree.")
        parse_markers(options.markers)
    if options.folds == 1:
        raise ValueError("--folds must be 0 (use --split) or at least 2.")
    if options.folds and not options.fold < options.folds:
        raise ValueError(f"--fold must be in 0..{options.folds - 1}; got {options.fold}.")
