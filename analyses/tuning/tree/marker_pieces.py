"""Markers that move pieces, not only leaves (issue 12, 2026-12-04 evening): measured offline.

    python analyses/tuning/tree/marker_pieces.py OUT.jsonl "RULE" RUN_FOLDER...

Each run's final refit is redone twice with the rule of `grouping_weights.py` (e.g.
"anchor0.5-0.85+linkage+markers:T cells=CD3D/CD3G", the default's final refit with those markers):
"leaves" with `tree.regroup_by_markers` switched off (markers move whole leaves only, the rule
before), "pieces" with it (the k-means pieces of a mixed leaf cross the marked class's border),
"pieces_sides" with it and the EM steps keeping each cell on its side of the marked classes
(`tree.marker_sides`; the two variants before run with that switched off), "pieces_noem" with it
and no EM steps after the re-seed (the components stay at the leaves' moments; EM follows the
latent's geometry, which may not hold what the markers add).
Scores (ARI L1-L4, level-4 weighted F1, validation and test cells) go to OUT, one line per run
and variant; a rerun skips what is there.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import grouping_weights  # noqa: E402  (sets one thread per run before TensorFlow starts)
from refit import append_row, runs_to_score, scores_by_part  # noqa: E402

tree = grouping_weights.tree
REGROUP = tree.regroup_by_markers
REFIT = tree.TreeVAE.refit_prior
SIDES = tree.marker_sides
VARIANTS = tuple(os.environ.get("MARKER_VARIANTS", "leaves,pieces,pieces_sides,pieces_noem").split(","))


def no_sides(leaf, parents, n_leaves, classes):
    return SIDES(leaf, parents, n_leaves, [])


def no_em(self, loc, scale, steps=10, **kwargs):
    return REFIT(self, loc, scale, steps=0, **kwargs)


def main(out, rule, folders):
    for folder, name, variant, (loc, scale, split, truth) in runs_to_score(out, "variant", VARIANTS, folders):
        tree.regroup_by_markers = REGROUP if variant != "leaves" else (lambda latent, leaf, *a, **k: leaf)
        tree.TreeVAE.refit_prior = no_em if variant == "pieces_noem" else REFIT
        tree.marker_sides = SIDES if variant == "pieces_sides" else no_sides
        try:
            model = grouping_weights.refit(folder, rule, loc, scale, split == "train")
        finally:
            tree.regroup_by_markers, tree.TreeVAE.refit_prior, tree.marker_sides = REGROUP, REFIT, SIDES
        append_row(out, {"run": name, "rule": rule, "variant": variant, **scores_by_part(model, loc, scale, split, truth)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [Path(p) for p in sys.argv[3:]])
