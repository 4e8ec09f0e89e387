"""Can label transfer's probabilities be trusted? Calibration of the call probabilities on query cells.

    python analyses/partial_labels/calibration.py [--seeds 0 1 2] [--only query_kang_2donors ...]
    python analyses/partial_labels/calibration.py --masks fine_5pct fine_10pct [--seeds 0 1 2]
    python analyses/partial_labels/calibration.py --model mixture [--seeds 0 1 2]   # the flat MixtureVAE
    python analyses/partial_labels/calibration.py --summary      # the table of the README

The reference-to-query settings of run.py (TreeVAE trained on the reference cells with all their
labels, as `run_query` does; the query annotated). For each query cell and level: the model's call
(`predict_levels`) and its probability, against the cell's true class: at the temperature fitted
on the reference's labelled validation cells (`treevae`, scvae_hier.calibration) and without it
(`treevae_uncalibrated`, the posterior as it is; the calls are the same). Beside it, the same
reading of logistic regression on the same latent (fitted on the reference's finest labels; its
leaf probabilities summed up the hierarchy; call: the most probable leaf and its ancestors, as
TreeVAE calls). `--model mixture`: the semi-supervised MixtureVAE instead (methods `mixturevae`,
`mixturevae_uncalibrated`, `lr_mixture_latent`; XLA, as run.py trains it). `--masks`: run.py's label-mask settings instead (PBMC, a share of the cells
labelled at the finest level; the runs run.py trains, in runs/partial/), scored on the
never-labelled cells from the run's outputs.h5ad; the uncalibrated posterior is the stored one
raised to the power T and renormalised (tempering is invertible), and logistic regression is fitted
on the labelled cells' latent. One JSON line per setting, seed, method and level in calibration.jsonl, written
as each finishes (a rerun skips them; trained models are kept in runs/calibration/):
- accuracy, mean probability of the call, expected calibration error (15 equal-width bins of the
  call's probability; the share-weighted |accuracy - mean probability|), the accuracy in the bins
  from 0.9 up;
- for each threshold t of `--unassigned-below` (0.5, 0.8, 0.9, 0.95, 0.99): the share of query
  cells still named at this level (a cell is unassigned from the first level whose probability is
  below t, as predict_levels does) and the accuracy among them.
"""
import argparse
import json
import os
import sys
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
from calibration_scores import rows  # noqa: E402
from run import PBMC, QUERIES, SETTINGS, query_split, trained, truth_paths  # noqa: E402
from scvae_hier.options import TrainOptions  # noqa: E402

OUT = HERE / "calibration.jsonl"
RUNS = HERE.parents[1] / "runs" / "calibration"
if os.environ.get("PARTIAL_SMOKE"):  # run.py's quick end-to-end check: 3 epochs, results in /tmp
    OUT, RUNS = Path("/tmp/calibration_smoke.jsonl"), Path("/tmp/calibration_smoke")


def done():
    if not OUT.exists():
        return set()
    return {(r["setting"], r["seed"], r["method"]) for r in map(json.loads, OUT.read_text().splitlines())}


MODELS = {"tree": ("TreeVAE", "treevae", "lr_same_latent", "", dict(xla=False)),   # class, method names, folder suffix
          "mixture": ("MixtureVAE", "mixturevae", "lr_mixture_latent", "_mixture", dict(xla=True))}


def reference_model(name, seed, reference, hierarchy, options, base, model_name="tree"):
    import scvae_hier as sh

    class_name, _, _, suffix, extra = MODELS[model_name]
    model_class = getattr(sh, class_name)
    folder = RUNS / f"{name}{suffix}_s{seed}"
    if (folder / "model.keras").exists():
        return model_class.load(folder, adata=reference)
    model_class.setup_anndata(reference, hierarchy=hierarchy)
    model = model_class(reference, semi_supervised=True, seed=seed, **extra, **options)
    # TreeVAE: run.py's 200 epochs; the mixture: its own default with labels (100), as run.py trains it
    epochs = min(base["epochs"], TrainOptions(data="x", model=model_name, semi_supervised=True).epochs)
    model.train(max_epochs=epochs, patience=base["patience"], progress_bar=False)
    model.save(folder, overwrite=True)
    return model


def named_calls(model, query, levels):
    """The model's calls [n, L] and their probabilities [n, L] (predict_levels)."""
    table = model.predict_levels(query, keep_labels=False)
    return (table[[f"scvae_{level}" for level in levels]].astype(str).to_numpy(),
            table[[f"scvae_{level}_probability" for level in levels]].to_numpy(dtype=float))


def lr_calls(model, reference, query, hierarchy):
    """Logistic regression on the model's latent: names [n, L] and the call's probability [n, L]."""
    leaves = truth_paths(reference, hierarchy)[:, -1]
    classifier = LogisticRegression(max_iter=2000).fit(model.get_latent_representation(reference), leaves)
    return classifier_reading(classifier, model.get_latent_representation(query), hierarchy)


def classifier_reading(classifier, latent, hierarchy):
    """A leaf classifier read as TreeVAE is: the most probable leaf and its ancestors [n, L], and
    each level's probability of its call, the leaves under it summed [n, L]."""
    leaf_probability = classifier.predict_proba(latent)
    up = {path[-1]: path for path in hierarchy.paths.values()}
    paths = np.array([up[c] for c in classifier.classes_], dtype=object)       # [leaves, L]
    names = paths[leaf_probability.argmax(axis=1)]
    probability = np.stack([(leaf_probability * (paths[:, i][None, :] == names[:, i][:, None])).sum(axis=1)
                            for i in range(len(hierarchy.levels))], axis=1)
    return names.astype(str), probability


def mask_run(name, seed):
    """A label-mask setting's run (trained by run.py's code if missing): the three readings of
    its never-labelled cells, their truth [n, L], the levels and the run's temperature."""
    import anndata

    from scvae_hier.calibration import ancestors_of, level_probabilities, tempered
    from scvae_hier.hierarchy import Hierarchy
    from scvae_hier.runs import load_model

    folder = trained(f"{name}_s{seed}", dict(PBMC, **SETTINGS[name], seed=seed))
    model = load_model(folder)
    temperature = model.metadata.get("temperature")
    adata = anndata.read_h5ad(folder / "outputs.h5ad")
    hierarchy = Hierarchy.from_anndata(anndata.read_h5ad(PBMC["data"], backed="r"))
    levels = list(hierarchy.levels)
    labelled = adata.obs["labelled"].to_numpy(bool)
    cells = ~labelled & np.isin(adata.obs[hierarchy.label_column].astype(str), list(hierarchy.paths))
    truth = truth_paths(adata[cells], hierarchy).astype(str)
    ancestors = ancestors_of(model)
    names = [np.asarray(model.metadata["cluster_names"][level], dtype=object) for level in levels]
    stored = np.asarray(adata.obsm[f"scvae_{levels[-1]}_probabilities"], dtype=np.float64)[cells]

    def reading(leaf):
        calls = [row[leaf.argmax(axis=1)] for row in ancestors]          # the most probable leaf, its ancestors
        by_level = level_probabilities(leaf, ancestors)
        return (np.stack([n[c] for n, c in zip(names, calls)], axis=1).astype(str),
                np.stack([p[np.arange(len(c)), c] for p, c in zip(by_level, calls)], axis=1))

    readings = {"treevae": reading(stored),
                "treevae_uncalibrated": reading(tempered(stored, 1.0 / temperature) if temperature else stored)}
    latent = np.asarray(adata.obsm["X_scvae"])
    finest = adata.obs[f"scvae_{levels[-1]}"].astype(str).to_numpy()            # labelled cells keep their labels
    classifier = LogisticRegression(max_iter=2000).fit(latent[labelled], finest[labelled])
    readings["lr_same_latent"] = classifier_reading(classifier, latent[cells], hierarchy)
    return readings, truth, levels, temperature, int(cells.sum())


def summary() -> str:
    """calibration.jsonl as a markdown table: means over seeds (ECE's min-max beside it)."""
    import pandas as pd

    table = pd.DataFrame([json.loads(line) for line in OUT.read_text().splitlines()])
    lines = ["| query | level | method | seeds | accuracy | mean probability | ECE (min-max) | named at 0.9: share / "
             "accuracy | named at 0.99: share / accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for (setting, level, method), group in table.groupby(["setting", "level", "method"], sort=False):
        lines.append(f"| {setting} | {level} | {method} | {len(group)} | {group['accuracy'].mean():.3f} | "
                     f"{group['mean_probability'].mean():.3f} | {group['ece'].mean():.3f} ({group['ece'].min():.3f}-"
                     f"{group['ece'].max():.3f}) | {group['named_0.9'].mean():.2f} / {group['accuracy_named_0.9'].mean():.3f} | "
                     f"{group['named_0.99'].mean():.2f} / {group['accuracy_named_0.99'].mean():.3f} |")
    temperatures = table.dropna(subset=["temperature"]).groupby(["setting", "seed"])["temperature"].first()
    lines.append("")
    lines.append("temperatures: " + ", ".join(f"{s} seed {seed} {t:.2f}" for (s, seed), t in temperatures.items()))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=list(QUERIES))
    parser.add_argument("--masks", nargs="+", choices=sorted(SETTINGS), help="label-mask settings instead of queries")
    parser.add_argument("--summary", action="store_true", help="print calibration.jsonl's table and stop")
    parser.add_argument("--model", choices=sorted(MODELS), default="tree", help="the model of the query settings")
    args = parser.parse_args()
    if args.summary:
        print(summary())
        return
    for name in args.masks or []:
        for seed in args.seeds:
            if {(name, seed, m) for m in ("treevae", "treevae_uncalibrated", "lr_same_latent")} <= done():
                continue
            readings, truth, levels, temperature, n = mask_run(name, seed)
            write(name, "never-labelled", seed, n, temperature, readings, truth, levels)
    if args.masks:
        return
    finished = done()
    _, method, lr_method, _, _ = MODELS[args.model]
    for name in args.only:
        for seed in args.seeds:
            if {(name, seed, m) for m in (method, f"{method}_uncalibrated", lr_method)} <= finished:
                continue
            spec, options, reference, query, hierarchy, groups = query_split(name)
            model = reference_model(name, seed, reference, hierarchy, options, spec["base"], args.model)
            truth = truth_paths(query, hierarchy).astype(str)
            levels = list(hierarchy.levels)
            temperature = model.module.metadata.get("temperature")
            readings = {method: named_calls(model, query, levels)}
            model.module.metadata.pop("temperature", None)           # the posterior as it was before 0.2's calibration
            readings[f"{method}_uncalibrated"] = named_calls(model, query, levels)
            readings[lr_method] = lr_calls(model, reference, query, hierarchy)
            write(name, "+".join(groups), seed, int(query.n_obs), temperature, readings, truth, levels)


def write(name, query, seed, n_scored, temperature, readings, truth, levels):
    """Append one line per method and level to calibration.jsonl (and print it)."""
    with OUT.open("a") as handle:
        for method, (n, p) in readings.items():
            for row in rows(truth, n, p, levels):
                line = {"setting": name, "query": query, "seed": seed, "method": method, "n_query": n_scored,
                        "temperature": temperature, **row}
                handle.write(json.dumps(line) + "\n")
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}), flush=True)


if __name__ == "__main__":
    main()
