"""How much should each level count when the final refit groups k-means clusters into leaves? (issue 12)

    python analyses/tuning/tree/grouping_weights.py RULE[,RULE...] RUN_FOLDER...
    python analyses/tuning/tree/grouping_weights.py report [RULE,RULE...]   # matched: runs with every RULE
    python analyses/tuning/tree/grouping_weights.py ratios DECAY RUN_FOLDER...

Offline, like refit_rules.py: each run's trained encoder is kept and only the final refit (re-seed
+ EM steps) is redone, so a rule's effect on a finished run is exactly what the final refit would
give with it. Rules:
- equal: every level's compactness alike (the rule before 2026-12-02);
- d<X>: level l's compactness times X^(l-1) (coarse levels first), e.g. d0.85;
- l<X>: the leaf level's compactness times X, the others 1;
- guard<X>: the model's own rule with grouping_decay X (d<X>, kept only if its within-leaf sum of
  squares is at most LEAF_TOLERANCE times that of `equal`).
- anchor<X>: the model's rule with top_level_decay X and grouping_decay 1: a coarse-first grouping
  (decay X) fixes each cluster's top-level class, the levels below are grouped with every level
  alike inside those classes; anchor<X>-<Y>: below with decay Y (top_level_decay X, grouping_decay Y).
- <RULE>+empty:<LEAF>: RULE with that leaf left empty (`empty_leaves`), e.g.
  anchor0.5-0.85+empty:Megakaryocytes.
- <RULE>+linkage: RULE with the top level placed by average linkage (`top_level_split="linkage"`,
  the default since 2026-12-03), e.g. anchor0.5-0.85+linkage (before +empty: or +markers:); without
  it, every rule places the top level by compactness (the rule before).
- <RULE>+markers:<CLASS=GENE/GENE;CLASS=GENE>: RULE with those marker genes (`markers`; genes among
  the run's own; "/" between genes, as "," separates rules), e.g.
  anchor0.5-0.85+markers:CD8 T=CD8A/CD8B (last in the rule).
Scores (ARI L1-L4, level-4 weighted F1) on validation and test cells go to grouping_weights.jsonl,
one line per run and rule; a rerun skips what is there. The rule is chosen on validation cells.
`ratios` prints, per run, each level's within-class sum of squares of the coarse-first grouping
(decay DECAY) over that of the levels-alike one, at the final refit's re-seed: what the guard
(LEAF_TOLERANCE) reads at the leaf level.
"""
import os
import sys

for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[name] = "1"
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import scvae_hier.tree_clustering as tree  # noqa: E402
from scvae_hier.hierarchy import Hierarchy  # noqa: E402
from scvae_hier.markers import resolve as resolve_markers, scores as marker_scores  # noqa: E402
from scvae_hier.tree_shape import leaf_ancestors  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "grouping_weights.jsonl"
sys.path.insert(0, str(HERE))
from refit import append_row, load_run, runs_to_score, scores_by_part  # noqa: E402

ORIGINAL = tree._tree_scores


def weighted_scores(weights):
    """tree._tree_scores with fixed level weights when it scores every level (the grouping)."""
    def scores(centres, counts, ancestors, assignments, level_weights=None):
        if len(ancestors) != len(weights):          # the top level alone (place_leaves)
            return ORIGINAL(centres, counts, ancestors, assignments, level_weights)
        return ORIGINAL(centres, counts, ancestors, assignments, weights)
    return scores


def model_decays(rule):
    """(top_level_decay, grouping_decay) the model runs with under `rule`; d<X> and l<X> patch the
    scores instead and run the levels-alike path (both 1)."""
    if rule.startswith("anchor"):                  # anchor<X>[-<Y>]: top level at X, below at Y (default 1)
        top, _, below = rule.removeprefix("anchor").partition("-")
        return float(top), float(below or 1.0)
    if rule.startswith("guard"):
        return 1.0, float(rule.removeprefix("guard"))
    return 1.0, 1.0


def refit(folder, rule, loc, scale, train):
    model = keras.saving.load_model(folder / "model.keras")
    n_levels = len(model.parents) + 1
    rule, _, markers = rule.partition("+markers:")
    rule, _, empty = rule.partition("+empty:")
    rule, linkage, _ = rule.partition("+linkage")
    model.top_level_split = "linkage" if linkage else "compact"   # the rule says how, not the run
    hierarchy = Hierarchy.from_dict(json.loads((folder / "config.json").read_text())["hierarchy"])
    model.markers, scores = [], None                # the rule says which markers, not the run
    if markers:
        cells = anndata.read_h5ad(folder / "outputs.h5ad")
        model.markers = resolve_markers(markers.replace("/", ",").split(";"), hierarchy, list(cells.var_names))
        scores = marker_scores(cells.X[train], model.markers)
    model.empty_leaves = []                         # the rule says which leaves are empty, not the run
    if empty:
        model.empty_leaves = [list(hierarchy.classes(n_levels - 1)).index(empty)]
    model.top_level_decay, model.grouping_decay = model_decays(rule)
    if rule.startswith("d"):
        tree._tree_scores = weighted_scores(float(rule[1:]) ** np.arange(n_levels))
    elif rule.startswith("l"):
        tree._tree_scores = weighted_scores(np.r_[np.ones(n_levels - 1), float(rule[1:])])
    try:
        model.refit_prior(loc[train], scale[train], steps=model.final_refit or 10, marker_scores=scores)
    finally:
        tree._tree_scores = ORIGINAL
    return model


def main(rules, folders):
    for folder, name, rule, (loc, scale, split, truth) in runs_to_score(OUT, "rule", rules, folders):
        model = refit(folder, rule, loc, scale, split == "train")
        append_row(OUT, {"run": name, "rule": rule, **scores_by_part(model, loc, scale, split, truth)})


def ratios(decay, folders):
    from sklearn.cluster import KMeans
    for folder in folders:
        model = keras.saving.load_model(folder / "model.keras")
        _, loc, _, split, _ = load_run(folder)
        latent = loc[split == "train"].astype("float64")
        n_leaves, ancestors = model.level_sizes[-1], leaf_ancestors(model.parents, model.level_sizes[-1])
        fit = KMeans(n_clusters=model.final_refit_clusters * n_leaves, n_init=10, random_state=model.seed).fit(latent)
        counts = np.bincount(fit.labels_, minlength=len(fit.cluster_centers_))
        within = []
        for weights in (None, tree.coarse_first_weights(len(ancestors), decay)):
            leaf = tree.assign_to_tree(fit.cluster_centers_, counts, model.parents, n_leaves, model.seed,
                                       level_weights=weights)[fit.labels_]
            within.append([tree._within_leaves(latent, row[leaf]) for row in ancestors])
        print(f"{folder.parent.name}/{folder.name}: within-class SS, coarse-first / levels alike, L1..L{len(ancestors)}:",
              " / ".join(f"{b / a:.3f}" for a, b in zip(*within)), flush=True)


def report(rules=None):
    """Mean (and minimum level-4 ARI) per rule and dataset; with `rules`, those rules only, over
    the runs that have every one of them (a matched comparison)."""
    rows = [json.loads(line) for line in OUT.read_text().splitlines()]
    runs = {}
    for row in rows:
        runs.setdefault(row["run"], {})[row["rule"]] = row
    if rules:
        runs = {name: scored for name, scored in runs.items() if all(rule in scored for rule in rules)}
    rules = rules or list(dict.fromkeys(row["rule"] for row in rows))
    for dataset, is_it in (("Kang", lambda n: "kang" in n or "restart" in n), ("PBMC", lambda n: "tree/" in n or "pbmc" in n)):
        for rule in rules:
            for part in ("validation", "test"):
                table = np.array([r[rule][part] for n, r in runs.items() if is_it(n) and rule in r])
                if len(table):
                    print(f"{dataset:<5} {rule:<9} {part:<10} n={len(table):>2}  ARI L1-L4 / wF1 "
                          + " / ".join(f"{m:.3f}" for m in table.mean(0)) + f"   min L4 {table[:, 3].min():.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        report(sys.argv[2].split(",") if len(sys.argv) > 2 else None)
    elif sys.argv[1:2] == ["ratios"]:
        ratios(float(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
    else:
        main(sys.argv[1].split(","), [Path(p) for p in sys.argv[2:]])
