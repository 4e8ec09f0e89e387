"""The `scvae-hier` command line. Options come from `TrainOptions`, so help and defaults
never drift from what a run stores."""
import argparse
import sys
from dataclasses import MISSING, fields

from .options import TrainOptions


def _add_options(parser, dataclass):
    for f in fields(dataclass):
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        if meta.get("positional"):
            parser.add_argument(f.name, help=meta["help"])
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
            continue
        kwargs = {"default": default, "help": meta["help"] + " (default: %(default)s)"}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
            kwargs["type"] = meta.get("type", str)
        elif f.type in ("int", "float", int, float):
            kwargs["type"] = {"int": int, "float": float}.get(f.type, f.type)
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scvae-hier", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Train a model on a count file and write a run folder.")
    _add_options(train, TrainOptions)
    return parser


def run_train(args) -> int:
    from .training import train
    from .runs import RunDirectory
    import json

    options = TrainOptions(**{f.name: getattr(args, f.name) for f in fields(TrainOptions)})
    path = train(options)
    metrics = json.loads(RunDirectory(path).metrics.read_text())
    print(f"\nRun written to {path} ({metrics['epochs_run']} epochs, best at epoch "
          f"{(metrics['best_epoch'] or 0) + 1}, {metrics['seconds']} s).")
    for subset, scores in metrics.get("ari", {}).items():
        print(f"ARI of clusters vs hierarchy levels ({subset} cells): "
              + ", ".join(f"{level} {value:.3f}" for level, value in scores.items()))
    print(f"Load it in Python with scvae_hier.load_model({str(path)!r}); per-cell outputs: {path}/outputs.h5ad")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as error:
        print(f"scvae-hier {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
