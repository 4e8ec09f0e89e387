"""Screen: do several semi-supervised TreeVAEs on the same labels, their leaf posteriors averaged,
name the unlabelled cells better than one? (Deep ensembles; never tried here before.)

    python analyses/partial_labels/ensemble.py MASK_SEED N_MEMBERS [--setting fine_10pct] [--score validation|unlabelled] [--genes N]

Every member sees the same cells, split and labels (those of MASK_SEED: the mask and split are
drawn with it); member k's weights, batch order and re-seeding k-means are drawn with
MASK_SEED * 1000 + k. Runs go to runs/partial_ensemble/<setting>_m<MASK_SEED>_w<k>/ (resumable:
a finished member is not retrained). Scores on the unlabelled cells (`--score validation`: only
those of the validation split, for choosing; `unlabelled`: every never-labelled cell) each member
alone and the ensembles of its first 1, 2, ... members: the argmax of the mean of the members'
finest-level posteriors, mapped up the hierarchy. One line per (mask seed, size) in ensemble.jsonl.
"""
import argparse
import json
import os
import sys
from pathlib import Path

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PBMC, ROOT, SETTINGS, scores, truth_paths  # noqa: E402

import anndata  # noqa: E402
import numpy as np  # noqa: E402

from scvae_hier import training  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402
from scvae_hier.options import TrainOptions  # noqa: E402
from scvae_hier.outputs import component_names  # noqa: E402
from scvae_hier.runs import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent


def train_member(setting, mask_seed, k, n_genes=None):
    """One member: the mask and split of mask_seed, everything else drawn with its own seed."""
    genes = f"_g{n_genes}" if n_genes else ""
    folder = ROOT / "runs" / "partial_ensemble" / f"{setting}{genes}_m{mask_seed}_w{k}"
    if (folder / "metrics.json").exists():
        return folder
    reveal, split_cells = training.reveal, training.split_cells
    training.reveal = lambda codes, spec, truth, seed: reveal(codes, spec, truth, mask_seed)
    training.split_cells = lambda n, split, seed: split_cells(n, split, mask_seed)
    try:
        resume = (folder / "config.json").exists()
        options = dict(PBMC, **SETTINGS[setting], seed=mask_seed * 1000 + k)
        if n_genes:
            options["n_genes"] = n_genes
        training.train(TrainOptions(**options,
                                    output=str(folder), resume=resume, overwrite=not resume))
    finally:
        training.reveal, training.split_cells = reveal, split_cells
    return folder


def leaf_posterior(folder, hierarchy):
    """The run's outputs, its finest-level posterior [cells, leaves] and the leaves' names (the
    run's own component names, `outputs.component_names`)."""
    adata = anndata.read_h5ad(folder / "outputs.h5ad")
    probabilities = np.asarray(adata.obsm[f"scvae_{hierarchy.levels[-1]}_probabilities"])
    names = component_names(load_model(folder), hierarchy.levels[-1], probabilities.shape[1])
    return adata, probabilities, names


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mask_seed", type=int)
    parser.add_argument("members", type=int)
    parser.add_argument("--setting", default="fine_10pct")
    parser.add_argument("--score", choices=("validation", "unlabelled"), default="validation")
    parser.add_argument("--genes", type=int, help="highly variable genes instead of run.py's 500 (folders _g<N>)")
    parser.add_argument("--train-only", type=int, nargs="*", help="train only these member indices, score nothing")
    args = parser.parse_args()
    if args.train_only is not None:
        for k in args.train_only:
            train_member(args.setting, args.mask_seed, k, args.genes)
        sys.exit()
    folders = [train_member(args.setting, args.mask_seed, k, args.genes) for k in range(args.members)]
    hierarchy = Hierarchy.from_anndata(anndata.read_h5ad(PBMC["data"], backed="r"))
    posteriors, first = [], None
    for folder in folders:
        adata, posterior, names = leaf_posterior(folder, hierarchy)
        if first is None:
            first, leaves = adata, names
        assert (names == leaves).all(), "the members name their components alike"
        assert (adata.obs_names == first.obs_names).all() and (adata.obs["labelled"] == first.obs["labelled"]).all()
        posteriors.append(posterior)
    cells = ~first.obs["labelled"].to_numpy(bool) & np.isin(first.obs[hierarchy.label_column].astype(str),
                                                             list(hierarchy.paths))
    if args.score == "validation":
        cells &= (first.obs["split"] == "validation").to_numpy()
    up = {path[-1]: path for path in hierarchy.paths.values()}
    paths = np.array([up[leaf] for leaf in leaves], dtype=object)      # [leaves, L]: each leaf and its ancestors
    truth = truth_paths(first[cells], hierarchy)
    # a member's own argmax must be its own call (calls and argmax agree where nothing is unassigned)
    own = first.obs[f"scvae_{hierarchy.levels[-1]}"].astype(str).to_numpy()[cells]
    agree = float(np.mean(own == leaves[posteriors[0][cells].argmax(1)]))
    results = []
    for size in range(1, len(folders) + 1):
        member = scores(truth, paths[posteriors[size - 1][cells].argmax(1)], hierarchy.levels, hierarchy)
        mean = np.mean(posteriors[:size], axis=0)[cells]
        ensemble = scores(truth, paths[mean.argmax(1)], hierarchy.levels, hierarchy)
        line = dict(setting=args.setting, n_genes=args.genes or PBMC["n_genes"], mask_seed=args.mask_seed, score=args.score, size=size,
                    n_scored=int(cells.sum()), first_member_call_agreement=round(agree, 4),
                    **{f"member_{key}": round(v, 4) for key, v in member.items()},
                    **{f"ensemble_{key}": round(v, 4) for key, v in ensemble.items()})
        results.append(line)
        print(f"size {size}: member {size - 1} ARI " + " / ".join(f"{member[f'ari_{i}']:.3f}" for i in range(1, 5))
              + f" F1 {member['macro_f1_4']:.3f} | ensemble ARI "
              + " / ".join(f"{ensemble[f'ari_{i}']:.3f}" for i in range(1, 5)) + f" F1 {ensemble['macro_f1_4']:.3f}")
    with open(HERE / "ensemble.jsonl", "a") as handle:
        for line in results:
            handle.write(json.dumps(line) + "\n")
