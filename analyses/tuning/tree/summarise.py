"""Mean and spread (min-max) over seeds of every setting in validation_scores.jsonl.

    python analyses/tuning/tree/summarise.py
"""
import json
import re
from pathlib import Path

import pandas as pd

rows = [json.loads(line) for line in (Path(__file__).resolve().parent / "validation_scores.jsonl").read_text().splitlines()]
table = pd.DataFrame(rows).drop_duplicates("run", keep="last")
table["setting"] = table["run"].map(lambda name: re.sub(r"_s\d+$", "", name))
columns = [c for c in table.columns if re.match(r"(ari|f1w)_\d$", c) or c.startswith(("latent_kmeans_ari", "scanpy_kmeans"))]
for setting, group in table.groupby("setting", sort=False):
    def show(prefix, n=4):
        parts = []
        for level in range(1, n + 1):
            values = group[f"{prefix}{level}"]
            parts.append(f"{values.mean():.2f}" + (f" ({values.min():.2f}-{values.max():.2f})" if len(values) > 1 else ""))
        return " / ".join(parts)
    f1 = group["f1w_4"]
    print(f"{setting:<22} n={len(group)}  ARI {show('ari_')}  L4 wF1 {f1.mean():.2f}"
          + (f" ({f1.min():.2f}-{f1.max():.2f})" if len(group) > 1 else "")
          + f"  val ELBO {group['val_elbo'].mean():.1f}")
    print(f"{'':<22}      k-means on latent {show('latent_kmeans_ari_')}; scanpy PCA+k-means {show('scanpy_kmeans_ari_')}"
          f" (L4 wF1 {group['scanpy_kmeans_f1w_last'].mean():.2f})")
