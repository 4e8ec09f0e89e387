"""The `scvae-hier` command line. Options come from `TrainOptions`, so help and defaults
never drift from what a run stores."""
import argparse
import sys
from dataclasses import MISSING, fields

from .options import REFIT_OPTIONS, TrainOptions
from .choices import DEFAULT_IWAE_SAMPLES, EVALUATION_SETS as SETS, MISSING_GENES


def _add_options(parser, dataclass, only=None):
    """One flag per field (of `only`, when given; those then default to "unchanged")."""
    for f in fields(dataclass):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        if only is not None:
            default = argparse.SUPPRESS
        if meta.get("positional"):
            parser.add_argument(f.name, help=meta["help"])
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
            continue
        clearable = only is not None and meta.get("nargs") == "+"     # a run's list can also be cleared
        kwargs = {"default": default,
                  "help": meta["help"] + (" (default: the run's; the flag alone clears it)" if clearable
                                          else " (default: the run's)" if only is not None
                                          else " (default: %(default)s)")}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("nargs"):
            kwargs["nargs"] = "*" if clearable else meta["nargs"]
            kwargs["type"] = meta.get("type", str)
        elif f.type in ("int", "float", int, float):
            kwargs["type"] = {"int": int, "float": float}.get(f.type, f.type)
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scvae-hier", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Train a model on a count file and write a run folder.")
    _add_options(train, TrainOptions)

    evaluate = commands.add_parser(
        "evaluate", help="ELBO, IWAE bound and per-level clustering scores of a trained run on chosen cells.")
    evaluate.add_argument("run", help="Run folder written by `scvae-hier train`.")
    evaluate.add_argument("--data", help="Count file to evaluate on (default: the file the run was trained on). "
                                         "It must hold the model's genes.")
    evaluate.add_argument("--set", dest="subset", choices=SETS,
                          help="Cells of the run's split to use (default: test for the training file; "
                               "another file is evaluated whole).")
    evaluate.add_argument("--iwae-samples", type=int, default=DEFAULT_IWAE_SAMPLES,
                          help="Importance samples per cell for the IWAE bound (the poster used 500) "
                               "(default: %(default)s)")
    evaluate.add_argument("--batch-size", type=int, default=256, help="Cells per batch (default: %(default)s)")
    evaluate.add_argument("--seed", type=int, default=0, help="Seed of the importance samples (default: %(default)s)")
    evaluate.add_argument("--drop-empty-cells", action="store_true",
                          help="Drop cells with no counts on the model's genes instead of failing.")

    analyse = commands.add_parser(
        "analyse", help="Figures and a Markdown report of a run, or a comparison of several runs "
                        "(and original scVAE runs).")
    analyse.add_argument("runs", nargs="+", help="Run folders written by `scvae-hier train`.")
    analyse.add_argument("--scvae", nargs="+", default=[], metavar="FOLDER",
                         help="Analyses folders written by the original scVAE (`scvae evaluate -A FOLDER`), "
                              "scored on the same cells as the runs.")
    analyse.add_argument("--output", help="Comparison folder (default: runs/comparison); a single run without "
                                          "--scvae or --output is reported in its own folder.")
    analyse.add_argument("--level", help="Level of Figure 1 (default: the finest).")
    analyse.add_argument("--set", dest="subset", default="test", choices=SETS,
                         help="Cells the scores are computed on (default: %(default)s)")
    analyse.add_argument("--iwae-samples", type=int, default=DEFAULT_IWAE_SAMPLES,
                         help="IWAE samples for runs not yet evaluated (default: %(default)s)")
    analyse.add_argument("--embedding", choices=["umap", "tsne"], default="umap",
                         help="2-D embedding of the latent (default: %(default)s)")
    analyse.add_argument("--no-figures", dest="figures", action="store_false",
                         help="In a comparison, skip Figures 2-3 and the per-run figures.")

    annotate = commands.add_parser(
        "annotate", help="Name the cells of a new count file with a trained model (label transfer): per-level "
                         "class names and probabilities, and the latent, in a new .h5ad.")
    annotate.add_argument("run", help="Run folder (or saved model folder) of a trained model.")
    annotate.add_argument("query", help="Count file to annotate (.h5ad, .loom, 10x .h5 or folder); genes are "
                                        "matched to the model's by name.")
    annotate.add_argument("--output", required=True, help="The annotated .h5ad to write.")
    annotate.add_argument("--unassigned-below", type=float, default=0.0,
                          help="Call a cell 'unassigned' from the first level whose posterior probability is below "
                               "this (default: %(default)s, never).")
    annotate.add_argument("--novelty-cutoff", type=float, default=None,
                          help="Call a cell 'unassigned' at every level when its novelty (the share of the training "
                               "cells of its component that the model explains better; TreeVAE) is above this, "
                               "e.g. 0.99 for types the reference lacked (default: never).")
    annotate.add_argument("--layer", help="The query's layer of raw counts, or X (default: where the model's "
                                          "training counts were, X unless it was trained with --layer).")
    annotate.add_argument("--batch", help="Read every query cell as this training batch (a model trained with a batch "
                                          "covariate refuses batches it never saw).")
    annotate.add_argument("--drop-empty-cells", action="store_true",
                          help="Leave out (NaN) cells with no counts on the model's genes instead of failing.")
    annotate.add_argument("--fit-new-batches", action="store_true",
                          help="Give the query's batches the model never saw covariate columns of their own and fit "
                               "only those on the query cells, the rest frozen (scArches' surgery); the model must "
                               "have been trained with --batch-key, and the query must have that obs column.")
    annotate.add_argument("--query-epochs", type=int, default=50,
                          help="Epochs of --fit-new-batches over the query cells (default: %(default)s).")
    annotate.add_argument("--save-model", help="With --fit-new-batches, also save the extended model to this folder.")
    annotate.add_argument("--missing-genes", choices=MISSING_GENES, default="refuse",
                          help="A query without some of the model's genes: refuse it, naming them (default), or add "
                               "them as zero counts, read as not expressed (the README measures the cost).")

    markers = commands.add_parser(
        "markers", help="Marker genes of every node of a trained model's hierarchy against its siblings "
                        "(differential expression of its denoised expression), one CSV.")
    markers.add_argument("run", help="Run folder (or saved model folder) of a model trained with a hierarchy.")
    markers.add_argument("data", help="Count file whose cells to compare (e.g. the training file).")
    markers.add_argument("--output", required=True, help="The .csv to write (a row per node and gene).")
    markers.add_argument("--groupby", help="obs column of class names at any level (default: the model's own "
                                           "finest-level predictions, so no labels are needed).")
    markers.add_argument("--n-genes", type=int, default=10, help="Genes per node at most (default: %(default)s).")
    markers.add_argument("--delta", type=float, default=0.25,
                         help="|log2 fold change| a gene must exceed (default: %(default)s).")
    markers.add_argument("--fdr", type=float, default=0.05, help="False discovery rate target (default: %(default)s).")
    markers.add_argument("--transform-batch", help="Decode every cell as from this training batch.")
    markers.add_argument("--layer", help="The file's layer of raw counts, or X (default: the model's training layer).")
    markers.add_argument("--batch", help="Read every cell as this training batch (for a batch the model never saw).")

    refit = commands.add_parser(
        "refit", help="Redo a trained TreeVAE's final prior refit with other settings (top-level rule, marker genes, "
                      "empty leaves, grouping weights) into a new run folder, without training again.")
    refit.add_argument("run", help="Finished TreeVAE run folder written by `scvae-hier train`.")
    refit.add_argument("--output", required=True, help="The new run folder.")
    refit.add_argument("--overwrite", action="store_true", help="Replace a run already in --output.")
    _add_options(refit, TrainOptions, only=REFIT_OPTIONS)

    experiment = commands.add_parser(
        "experiment", help="Run (or continue) a cross-validated comparison described by a YAML file, "
                           "e.g. analyses/poster.yaml, and write its results folder.")
    experiment.add_argument("config", help="Experiment YAML (see analyses/poster.yaml).")
    experiment.add_argument("--folds", nargs="+", type=int, metavar="FOLD",
                            help="Only these folds (default: all); rerun without it to finish the rest.")
    return parser


def run_train(args) -> int:
    from .training import train
    from .runs import RunDirectory
    import json

    options = TrainOptions(**{f.name: getattr(args, f.name) for f in fields(TrainOptions)})
    path = train(options, given=args.given)
    metrics = json.loads(RunDirectory(path).metrics.read_text())
    print(f"\nRun written to {path} ({metrics['epochs_run']} epochs, best at epoch "
          f"{(metrics['best_epoch'] or 0) + 1}, {metrics['seconds']} s).")
    _print_scores(path, metrics)
    return 0


def run_refit(args) -> int:
    from .refit import refit_run
    from .runs import RunDirectory
    import json

    changes = {name: getattr(args, name) for name in REFIT_OPTIONS if hasattr(args, name)}
    path = refit_run(args.run, args.output, overwrite=args.overwrite, **changes)
    metrics = json.loads(RunDirectory(path).metrics.read_text())
    print(f"\nRun written to {path}: the training of {args.run}, its final refit redone"
          + (" with " + ", ".join(f"{k}={v}" for k, v in changes.items()) if changes else "")
          + f" ({metrics['seconds']} s).")
    _print_scores(path, metrics)
    return 0


def _print_scores(path, metrics) -> None:
    counts = metrics.get("ari_scored_cells", {})
    for subset, scores in metrics.get("ari", {}).items():
        scored = (f"; {counts[subset]['cells']} with a true label, {counts[subset]['labelled']} of them given it "
                  "in training" if subset in counts else "")
        print(f"ARI of clusters vs hierarchy levels ({subset} cells{scored}): "
              + ", ".join(f"{level} {value:.3f}" for level, value in scores.items()))
    if "temperature" in metrics:
        print(f"Class probabilities calibrated on the labelled validation cells: temperature {metrics['temperature']:.2f} "
              "(q(leaf|x)^(1/T), renormalised; the calls are unchanged).")
    for subset, levels in metrics.get("ari_one_class_levels", {}).items():
        print(f"{', '.join(levels)} ({subset} cells): one true class among the scored cells, so ARI says nothing "
              "there (0 for any split of them, 1 where they share one cluster).")
    if counts and "unlabelled" not in counts:
        print("No never-labelled cell has a true label to score against, so these ARIs mostly show the fit to the "
              "given labels, not how well the model names new cells. To measure that, keep all labels and hide some "
              "with --labelled LEVEL=FRACTION (the README's partial-labels experiments).")
    if "placement_margin" in metrics:
        print(metrics["placement_margin"]["reading"])
    print(f"Load it in Python with scvae_hier.load_model({str(path)!r}); per-cell outputs: {path}/outputs.h5ad")


class _Progress:
    """IWAE progress as a Keras progress bar (one line per update when not on a terminal)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done, total):
        import keras

        if self.bar is None:
            self.bar = keras.utils.Progbar(total, unit_name="batch", verbose=1 if sys.stderr.isatty() else 2)
        self.bar.update(done)


def run_evaluate(args) -> int:
    from .analysis.evaluate import evaluate_run, format_evaluation, write_evaluation

    evaluation = evaluate_run(args.run, data=args.data, subset=args.subset, iwae_samples=args.iwae_samples,
                              batch_size=args.batch_size, seed=args.seed,
                              drop_empty_cells=args.drop_empty_cells or None, progress=_Progress())
    files = write_evaluation(evaluation)
    print(format_evaluation(evaluation))
    print(f"Written to {evaluation.folder}: " + ", ".join(f.name for f in files))
    return 0


def run_analyse(args) -> int:
    from .analysis.report import analyse

    analyse(args.runs, scvae=args.scvae, output=args.output, level=args.level, subset=args.subset,
            iwae_samples=args.iwae_samples, embedding=args.embedding, figures=args.figures)
    return 0


def run_experiment(args) -> int:
    from .analysis.experiment import run_experiment as run

    run(args.config, only_folds=args.folds)
    return 0


def run_annotate(args) -> int:
    from .annotation import annotate_file

    adata = annotate_file(args.run, args.query, args.output, args.unassigned_below, args.batch, args.drop_empty_cells,
                          fit_batches_epochs=args.query_epochs if args.fit_new_batches else 0,
                          save_model=args.save_model, novelty_cutoff=args.novelty_cutoff, layer=args.layer,
                          missing_genes=args.missing_genes)
    levels = [c for c in adata.obs.columns if c.startswith("scvae_") and c != "scvae_novelty"
              and not c.endswith(("_cluster", "_probability"))]
    for column in levels:
        counts = adata.obs[column].value_counts()
        print(f"{column}: " + ", ".join(f"{name} {count}" for name, count in counts.head(12).items()))
    if "scvae_novelty" in adata.obs:
        novelty = adata.obs["scvae_novelty"]
        print(f"scvae_novelty: median {novelty.median():.2f}; above 0.99 (explained worse than 99% of the training "
              f"cells of their component): {int((novelty > 0.99).sum())} of {int(novelty.notna().sum())} cells"
              + (f"; above --novelty-cutoff {args.novelty_cutoff}: {int((novelty > args.novelty_cutoff).sum())}, "
                 f"called unassigned" if args.novelty_cutoff is not None else ""))
    fitted = list(adata.uns["scvae_annotation"]["fitted_batches"])
    if fitted:
        print(f"Fitted the query's new batch(es) {fitted} for {args.query_epochs} epochs, the rest of the model frozen"
              + (f"; extended model saved to {args.save_model}" if args.save_model else ""))
    added = list(adata.uns["scvae_annotation"]["genes_added_as_zeros"])
    if added:
        print(f"{len(added)} of the model's genes were missing from the query and read as zero counts "
              f"(uns['scvae_annotation']['genes_added_as_zeros'])")
    print(f"Annotated {adata.n_obs} cells; written to {args.output}")
    return 0


def run_markers(args) -> int:
    from pathlib import Path

    from .annotation import counts_for_model
    from .api import load

    output = Path(args.output)
    if output.suffix != ".csv":
        raise ValueError(f"--output must be a .csv file, got {str(output)!r}.")
    model = load(args.run)
    _, counts = counts_for_model(model, args.data, args.layer)
    table = model.hierarchy_markers(counts, groupby=args.groupby, n_genes=args.n_genes, batch=args.batch,
                                    delta=args.delta, fdr_target=args.fdr, transform_batch=args.transform_batch)
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False)
    for (level, node, against), genes in table.groupby(["level", "node", "against"], sort=False)["gene"]:
        print(f"{level}: {node} (against {against}): {' '.join(genes)}")
    print(f"{len(table)} marker rows for {table['node'].nunique()} nodes written to {output}")
    return 0


COMMANDS = {"train": run_train, "refit": run_refit, "evaluate": run_evaluate, "analyse": run_analyse,
            "experiment": run_experiment, "annotate": run_annotate, "markers": run_markers}


def typed_options(argv) -> set:
    """The TrainOptions the user typed on the command line (a resumed run refuses those that
    would change it; defaults never count)."""
    parser = argparse.ArgumentParser(add_help=False)
    for f in fields(TrainOptions):
        if not f.metadata.get("positional"):
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, nargs="*", default=argparse.SUPPRESS)
            if isinstance(f.default, bool):
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, nargs="*",
                                    default=argparse.SUPPRESS)
    known, _ = parser.parse_known_args(argv)
    return set(vars(known))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given = typed_options(argv[1:]) if args.command == "train" else set()
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as error:
        print(f"scvae-hier {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        run = getattr(interrupt, "run_path", None)
        hint = (f" Continue it with: scvae-hier train {interrupt.data} --output {run} --resume" if run is not None
                else "")
        print(f"\nscvae-hier {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
