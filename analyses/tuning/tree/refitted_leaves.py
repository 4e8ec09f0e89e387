"""Measured and dropped (2026-12-04, NOTES.md): after the final refit's EM steps, re-place the
prior's own leaves (argmax q(c|x) of the training cells) by the rule that placed the re-seed's
leaves (`place_leaves`: labels, markers, empty leaves as in the run), moving their components with
them (a relabelling: the mixture is unchanged, only which tree slot each component sits in).
Each run's refit is redone into OUT/<name> with that step added (same encoder, `refit_run`), and
the ARI of its own clusters per level is printed against the run as it is, on the test cells or
(--unlabelled) on the cells never labelled. One JSON line per run (refitted_leaves.jsonl).

    python analyses/tuning/tree/refitted_leaves.py OUT RUN [RUN ...] [--unlabelled]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE))
import scvae_hier.tree_clustering as tree  # noqa: E402
from scvae_hier.models.tree import TreeVAE  # noqa: E402
from fragment_guard import level_aris  # noqa: E402
from scvae_hier.refit import refit_run  # noqa: E402

MOVED = {}  # leaves the last re-placement moved


def replace_leaves(model, loc, component, labels, marker_scores):
    """Re-place the refitted prior's leaves (the training cells' `component` [n]) in the tree and move
    their components (and p(c)) along."""
    per, n_leaves = model.components_per_leaf, model.level_sizes[-1]
    leaf, parents, kept, conflicts = model.leaves_to_place(component, labels)
    markers = None if marker_scores is None else (marker_scores, model.marker_classes)
    if markers is not None and model.empty_leaves:
        markers = tree._pruned_markers(markers, model.parents, n_leaves, parents, kept)
    k = len(kept)
    placed = tree.place_leaves(np.asarray(loc, float), leaf, parents, k, model.seed, markers=markers,
                               conflicts=conflicts, top_level=model.top_level_split)
    slot = -np.ones(k, dtype=int)
    for j in range(k):
        if (leaf == j).any():
            slot[j] = placed[leaf == j][0]
    free = [s for s in range(k) if s not in set(slot)]
    slot[slot < 0] = free
    new_leaf = np.arange(n_leaves)
    new_leaf[kept] = kept[slot]
    old_of_new = np.empty(model.n_components, dtype=int)
    for c in range(model.n_components):
        old_of_new[new_leaf[c // per] * per + c % per] = c
    comps = model.components
    means, raw = comps.loc.numpy()[old_of_new], comps.raw_scale.numpy()[old_of_new]
    comps.set_moments(means, np.ones_like(means))
    comps.raw_scale.assign(raw)
    if getattr(comps, "raw_df", None) is not None:
        comps.raw_df.assign(comps.raw_df.numpy()[old_of_new])
    if model.prior_probabilities == "learnable":
        model.prior_logits.assign(model.prior_logits.numpy()[old_of_new])
    MOVED["leaves"] = int((new_leaf != np.arange(n_leaves)).sum())

original = TreeVAE.refit_prior


def refit_then_replace(self, loc, scale, steps=10, reseed=True, labels=None, marker_scores=None):
    component = original(self, loc, scale, steps, reseed, labels, marker_scores)
    if reseed and self.leaf_placement == "graph":
        replace_leaves(self, loc, component, labels, marker_scores)
    return self.component_log_posterior(tf.constant(loc, tf.float32), tf.constant(scale, tf.float32),
                                        tf.constant(loc, tf.float32)).numpy().argmax(axis=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--unlabelled", action="store_true", help="score the cells never labelled, not the test cells")
    args = parser.parse_args()
    TreeVAE.refit_prior = refit_then_replace
    for run in map(Path, args.runs):
        target = Path(args.out) / run.name
        MOVED.clear()
        if not (target / "outputs.h5ad").exists():
            refit_run(run, target, log=lambda *_: None, overwrite=True)
        before, after = level_aris(run, args.unlabelled), level_aris(target, args.unlabelled)
        print(json.dumps({"run": str(run), "cells": "unlabelled" if args.unlabelled else "test", "as_run": before,
                          "replaced": after, "difference": list(np.round(np.subtract(after, before), 4)),
                          "leaves_moved": MOVED.get("leaves")}), flush=True)


if __name__ == "__main__":
    main()
