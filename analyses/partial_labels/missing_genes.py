"""What it costs to annotate a query that lacks some of the model's genes (read as zero counts,
`scvae_hier.prepare_query_anndata` / `scvae-hier annotate --missing-genes zeros`).

    python analyses/partial_labels/missing_genes.py [--settings query_kang_2donors query_pbmc_mudan] [--seed 0]

For each reference-to-query setting of run.py (labels on the reference cells, the query's cells
annotated): TreeVAE is trained on the reference as run.py does (saved in runs/missing_genes/, and
loaded from there on a rerun), then the query is annotated with a share of the model's genes
removed and padded back as zeros: chosen at random (3 draws per share), or the most expressed
genes of the reference (the worst case: they carry most of the counts). Scores on the query cells
as run.py's (per-level ARI, accuracy, macro F1), beside the share of the reference's counts the
removed genes carry and the share the model expects of the query's (what the warning says); one row per case appended to missing_genes.csv as
it finishes, so a rerun skips what is done.
"""
import argparse
import csv
import os
import sys
import warnings
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(name, "2")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from run import query_split, scores, truth_paths  # noqa: E402

import scvae_hier as sh  # noqa: E402
from scvae_hier.annotation import MissingGenesWarning  # noqa: E402

RESULTS = HERE / "missing_genes.csv"
RUNS = ROOT / "runs" / "missing_genes"
RANDOM_SHARES = (0.0, 0.05, 0.1, 0.2, 0.4)
TOP_SHARES = (0.01, 0.05, 0.1, 0.2)
DRAWS = 3


def reference_model(name, seed):
    """run.py's reference model of a setting (trained once, then loaded)."""
    spec, options, reference, query, hierarchy, _ = query_split(name)
    folder = RUNS / f"{name}_s{seed}"
    if (folder / "model.keras").exists():   # saved whole (the save is atomic)
        return sh.load(folder, adata=reference), reference, query, hierarchy
    sh.TreeVAE.setup_anndata(reference, hierarchy=hierarchy)
    model = sh.TreeVAE(reference, semi_supervised=True, seed=seed, xla=False, **options)
    model.train(max_epochs=spec["base"]["epochs"], patience=spec["base"]["patience"], progress_bar=False)
    model.save(folder, overwrite=True)
    return model, reference, query, hierarchy


def done_cases():
    if not RESULTS.exists():
        return set()
    with RESULTS.open() as handle:
        return {(r["setting"], r["seed"], r["removed"], r["share"], r["draw"]) for r in csv.DictReader(handle)}


def append(row):
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["query_kang_2donors", "query_pbmc_mudan"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    done = done_cases()
    for name in args.settings:
        model, reference, query, hierarchy = reference_model(name, args.seed)
        genes = np.array(model.module.metadata["genes"], dtype=object)
        layer = model.module.metadata.get("layer")
        counts = reference.layers[layer] if layer else reference.X
        column = reference.var_names.get_indexer(genes)
        mean_counts = np.asarray(counts[:, column].mean(axis=0)).ravel()
        by_expression = genes[np.argsort(-mean_counts)]
        truth = truth_paths(query, hierarchy)
        cases = [("random", share, draw) for share in RANDOM_SHARES for draw in range(DRAWS if share else 1)]
        cases += [("most_expressed", share, 0) for share in TOP_SHARES]
        for removed, share, draw in cases:
            key = (name, str(args.seed), removed, str(share), str(draw))
            if key in done:
                continue
            n_removed = int(round(share * len(genes)))
            if removed == "random":
                dropped = np.random.default_rng([args.seed, draw, n_removed]).choice(genes, n_removed, replace=False)
            else:
                dropped = by_expression[:n_removed]
            part = query[:, ~query.var_names.isin(list(dropped))].copy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MissingGenesWarning)
                padded = sh.prepare_query_anndata(part, model)
            table = model.predict_levels(padded, prefix="")
            predicted = table[hierarchy.levels].astype(str).to_numpy()
            share_of_counts = float(mean_counts[np.isin(genes, dropped)].sum() / mean_counts.sum())
            expected = (np.nanmean(model.get_normalized_expression(padded, gene_list=list(dropped)).to_numpy().sum(axis=1))
                        if n_removed else 0.0)    # what the warning reports
            row = dict(setting=name, seed=args.seed, removed=removed, share=share, draw=draw, n_genes_removed=n_removed,
                       share_of_reference_counts=round(share_of_counts, 4),
                       share_the_model_expects=round(float(expected), 4), n_query=query.n_obs,
                       **{k: round(v, 4) for k, v in scores(truth, predicted, hierarchy.levels, hierarchy).items()})
            append(row)
            aris = " / ".join(f"{row[f'ari_{i + 1}']:.3f}" for i in range(len(hierarchy.levels)))
            print(f"{name} {removed} {share:.0%} draw {draw}: {n_removed} genes ({share_of_counts:.1%} of the counts) "
                  f"ARI {aris}", flush=True)


if __name__ == "__main__":
    main()
