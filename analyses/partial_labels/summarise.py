"""Mean and spread over seeds of the partial-labels results, as the README's Markdown table.

    python analyses/partial_labels/summarise.py [--seeds 0 1 2] [--results results_60_epochs.csv]

--seeds keeps those seeds only (the README's tables are seeds 0-2; some settings have more);
--results reads another results file of this folder beside scanvi_results.csv (the 60-epoch rows).
"""
import argparse
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
ORDER = ["fine_1pct", "fine_5pct", "fine_10pct", "fine_5pct_2000genes", "fine_10pct_2000genes", "l1_1pct", "l1_1pct_2000genes", "l1_5pct", "l1_10pct", "l1_1pct_markers", "l12_5pct",
         "l2_10pct_fine_1pct", "unknown_cd14", "kang_l1_1pct"]


def cell(values):
    values = values.dropna()
    if values.empty:
        return ""
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ({values.min():.2f}-{values.max():.2f})"


def main(seeds=None, results="results.csv"):
    tables = [pd.read_csv(path) for path in (HERE / results, HERE / "scanvi_results.csv") if path.exists()]
    results = pd.concat(tables, ignore_index=True)
    if seeds:
        results = results[results["seed"].isin(seeds)]
    results["base"] = results["setting"].str.split(" ").str[0]
    order = {name: i for i, name in enumerate(ORDER)}
    print("| setting | method | seeds | ARI L1 | L2 | L3 | L4 | L4 macro F1 | hier. F1 | consistency | CD14 unassigned |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (setting, method), rows in sorted(results.groupby(["setting", "method"]),
                                          key=lambda item: (order.get(item[0][0].split(" ")[0], 99), item[0][1])):
        print(f"| {setting} | {method} | {len(rows)} | " + " | ".join(cell(rows[f"ari_{i}"]) for i in range(1, 5))
              + f" | {cell(rows['macro_f1_4'])} | {cell(rows['hierarchical_f1'])} | {cell(rows['consistency'])}"
              + f" | {cell(rows['novel_unassigned'])} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--results", default="results.csv")
    args = parser.parse_args()
    main(args.seeds, args.results)
