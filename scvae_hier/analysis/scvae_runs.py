"""Read the analyses folders written by the original scVAE (2.1.x), to put its results beside ours.

scVAE nests one evaluation under
`<data set>/<split>/<preprocessing>/<model type>/<latent distribution>[-c_<K>]/
<likelihood>-l_<latent>-h_<hidden>-mc_<R>-iw_<S>[-bn][-wu_<W>]/[run_<ID>/]e_<epochs>-mc_<R>-iw_<S>/<set>/`
and writes there `<set>-metrics.{log,pkl.gz}`, `<set>-prediction-<id>.{log,pkl.gz}`,
`latent_values-{z,y}.tsv.gz` and `predictions/predictions-<id>-predicted_{cluster_ids,labels}.tsv.gz`,
all TSVs indexed by cell id. The settings are only recorded in that path, so they are parsed from it.
"""
import gzip
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics import level_scores


class ScvaeRunError(ValueError):
    """A folder holds no (or more than one) scVAE run, or its files do not fit our data."""


EXPECTED = ("<set>-metrics.log / <set>-metrics.pkl.gz, latent_values-z.tsv.gz / "
            "latent_values-y.tsv.gz, or predictions/predictions-<method>_<K>-predicted_cluster_ids.tsv.gz")
_CLUSTER_IDS = "-predicted_cluster_ids.tsv.gz"
_LABELS = "-predicted_labels.tsv.gz"
MIN_MATCHED = 0.9


def _is_run_file(path):
    name = path.name
    return (name.endswith("-metrics.log") or name.endswith("-metrics.pkl.gz")
            or (name.startswith("latent_values") and name.endswith(".tsv.gz")))


def find_scvae_runs(folder):
    """Every evaluation-set folder (the one holding metrics / latent values) under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScvaeRunError(f"{str(folder)!r} is not a folder")
    runs = set()
    for path in [folder, *folder.rglob("*")]:
        if path.is_file() and _is_run_file(path):
            runs.add(path.parent)
        elif path.is_file() and path.name.endswith(_CLUSTER_IDS) and path.parent.name == "predictions":
            runs.add(path.parent.parent)
    if not runs:
        raise ScvaeRunError(
            f"no scVAE output under {str(folder)!r}: expected an evaluation-set folder holding "
            f"{EXPECTED} (as written by `scvae evaluate -A <folder>`)")
    return sorted(runs)


# -- settings from the path -------------------------------------------------------------

def _number(text):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse_settings(path):
    """Settings encoded in an evaluation folder's path; unknown parts are left as None."""
    parts = Path(path).parts
    s = dict.fromkeys(["data_set", "split", "preprocessing", "model_type", "latent_distribution",
                       "n_clusters", "likelihood", "latent_size", "hidden_sizes", "batch_norm",
                       "warm_up", "mc_samples", "iw_samples", "k_max", "count_sum", "kl_weight",
                       "run_id", "epochs", "evaluation_set", "prediction_method"])
    s["evaluation_set"] = parts[-1] if parts else None
    types = [i for i, p in enumerate(parts) if p in ("VAE", "GMVAE")]
    if not types or types[-1] < 3 or types[-1] + 2 >= len(parts):
        return s
    i = types[-1]
    s.update(data_set=parts[i - 3], split=parts[i - 2], preprocessing=parts[i - 1],
             model_type=parts[i])
    latent = parts[i + 1].split("-")
    s["latent_distribution"] = latent[0]
    for token in latent[1:]:
        if token.startswith("c_"):
            s["n_clusters"] = _number(token[2:])
    likelihood = parts[i + 2].split("-")
    s["likelihood"] = likelihood[0]
    s["batch_norm"] = "bn" in likelihood[1:]
    s["count_sum"] = "sum" in likelihood[1:]
    tags = {"l": "latent_size", "mc": "mc_samples", "iw": "iw_samples", "k": "k_max",
            "wu": "warm_up", "klw": "kl_weight"}
    for token in likelihood[1:]:
        key, _, value = token.partition("_")
        if key == "h":
            s["hidden_sizes"] = [int(h) for h in value.split("_") if h]
        elif key in tags and value:
            s[tags[key]] = _number(value)
    for part in parts[i + 3:-1]:
        if part.startswith("run_"):
            s["run_id"] = part[len("run_"):]
        elif part.startswith("e_"):
            s["epochs"] = _number(part.split("-")[0][2:])
    return s


# -- metrics from the pickles or logs -----------------------------------------------------

class _PlainUnpickler(pickle.Unpickler):
    """Loads only builtins, numpy and pandas objects: a shared pickle must not run code."""

    def find_class(self, module, name):
        if module.split(".")[0] in ("builtins", "collections", "datetime", "numpy", "pandas"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path):
    """The pickled object, or None when it cannot be read (the .log text is used instead)."""
    try:
        with gzip.open(path, "rb") as handle:
            return _PlainUnpickler(handle).load()
    except Exception:  # corrupt, truncated, or objects we refuse: fall back to the log
        return None


def _scalar(value):
    """A float from a number or a one-element array (scVAE stores arrays of past evaluations)."""
    if value is None:
        return None
    array = np.asarray(value, dtype=float).ravel()
    return float(array[-1]) if array.size else None


_EVALUATION_NAMES = {"lower_bound": "ELBO", "reconstruction_error": "ENRE",
                     "kl_divergence": "KL", "kl_divergence_z": "KL_z",
                     "kl_divergence_y": "KL_y"}
_LINE = re.compile(r"^\s*([A-Za-z_ ]+?):\s*([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
                   r"\s*(%?)\s*\.?\s*$")


def parse_metrics_log(text):
    """ELBO, ENRE, KL terms and accuracy (as a fraction) from the `Evaluation:` block of a log."""
    metrics, inside = {}, False
    for line in text.splitlines():
        if line.strip() == "Evaluation:":
            inside = True
            continue
        if inside and not line.strip():
            break
        match = _LINE.match(line) if inside else None
        if match:
            key, value, percent = match.groups()
            key = "accuracy" if key.lower() == "accuracy" else key.strip()
            metrics[key] = float(value) / (100.0 if percent else 1.0)
    return metrics


def _metrics_from_pickle(obj):
    if not isinstance(obj, dict) or not isinstance(obj.get("evaluation"), dict):
        return None
    metrics = {_EVALUATION_NAMES.get(k, k): _scalar(v) for k, v in obj["evaluation"].items()}
    if obj.get("accuracy") is not None:
        metrics["accuracy"] = _scalar(obj["accuracy"])
    return metrics


_PREDICTION_NAMES = {"adjusted rand index": "ARI", "adjusted mutual information": "AMI",
                     "silhouette score": "silhouette"}


def parse_prediction_log(text):
    """ARI / AMI / silhouette of clusters and of mapped labels, and the method, from a log."""
    metrics, info, section = {}, {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Prediction method:"):
            info["method"] = stripped.split(":", 1)[1].strip()
        elif stripped.rstrip(":").lower() in _PREDICTION_NAMES and stripped.endswith(":"):
            section = _PREDICTION_NAMES[stripped.rstrip(":").lower()]
        elif section:
            match = _LINE.match(line)
            if match and match.group(1).strip().lower() in ("clusters", "labels"):
                metrics[f"{section}_{match.group(1).strip().lower()}"] = float(match.group(2))
    return metrics, info.get("method")


def _prediction_from_pickle(obj):
    if not isinstance(obj, dict) or not isinstance(obj.get("clustering metric values"), dict):
        return None, None
    metrics = {}
    for name, values in obj["clustering metric values"].items():
        short = _PREDICTION_NAMES.get(name.lower(), name)
        for kind, value in (values or {}).items():
            if value is not None and ";" not in kind:  # skip the unused 'superset' variants
                metrics[f"{short}_{kind}"] = _scalar(value)
    return metrics, obj.get("prediction method")


def _read_metrics(folder, stem):
    """Metrics from <stem>.pkl.gz when readable, else from <stem>.log; {} when neither exists."""
    pkl, log = folder / f"{stem}.pkl.gz", folder / f"{stem}.log"
    return (_load_pickle(pkl) if pkl.is_file() else None,
            log.read_text(encoding="utf-8", errors="replace") if log.is_file() else None)


# -- the run -----------------------------------------------------------------------------

@dataclass
class ScvaeRun:
    """One scVAE evaluation: its settings, clusters, latent values and logged metrics."""
    path: Path
    settings: dict
    cluster_ids: pd.Series
    predicted_labels: pd.Series = None
    latent_z: pd.DataFrame = None
    latent_y: pd.DataFrame = None  # q(y|x): column k is cluster id k
    metrics: dict = field(default_factory=dict)
    prediction_metrics: dict = field(default_factory=dict)


def _read_tsv(path):
    table = pd.read_csv(path, sep="\t", index_col=0)
    table.index = table.index.astype(str)
    table.index.name = "cell"
    return table


def _resolve(path):
    """The single run folder at or under `path`."""
    runs = find_scvae_runs(path)
    if len(runs) > 1:
        listing = "\n  ".join(str(r) for r in runs)
        raise ScvaeRunError(f"{str(path)!r} holds {len(runs)} scVAE runs; pass one of:\n  {listing}")
    return runs[0]


def read_scvae_run(path, prediction=None):
    """Read the run at `path` (its set folder, or an ancestor holding exactly one run).

    `prediction` picks one of several prediction ids (e.g. "model_9", "kmeans_9_full") when the
    same folder was evaluated with more than one prediction method.
    """
    folder = _resolve(path)
    settings = parse_settings(folder)
    set_name = folder.name

    files = sorted((folder / "predictions").glob(f"predictions-*{_CLUSTER_IDS}"))
    ids = [f.name[len("predictions-"):-len(_CLUSTER_IDS)] for f in files]
    if not ids:
        raise ScvaeRunError(
            f"{folder} has no predicted cluster ids (expected predictions/predictions-<method>_<K>"
            f"{_CLUSTER_IDS}); rerun `scvae evaluate` with --included-analyses predictions")
    if prediction is None and len(ids) > 1:
        raise ScvaeRunError(f"{folder} holds predictions {ids}; choose one with prediction=")
    chosen = prediction if prediction is not None else ids[0]
    if chosen not in ids:
        raise ScvaeRunError(f"{folder} has no prediction {chosen!r}; it holds {ids}")

    cluster_table = _read_tsv(folder / "predictions" / f"predictions-{chosen}{_CLUSTER_IDS}")
    cluster_ids = cluster_table.iloc[:, 0].rename("cluster_id")
    labels_path = folder / "predictions" / f"predictions-{chosen}{_LABELS}"
    predicted_labels = (_read_tsv(labels_path).iloc[:, 0].astype(str).rename("predicted_label")
                        if labels_path.is_file() else None)

    z_path = next((p for p in (folder / "latent_values-z.tsv.gz", folder / "latent_values.tsv.gz")
                   if p.is_file()), None)
    y_path = folder / "latent_values-y.tsv.gz"
    latent_z = _read_tsv(z_path) if z_path else None
    latent_y = _read_tsv(y_path) if y_path.is_file() else None

    pickled, log = _read_metrics(folder, f"{set_name}-metrics")
    metrics = _metrics_from_pickle(pickled)
    if metrics is None:
        metrics = parse_metrics_log(log) if log else {}

    pickled, log = _read_metrics(folder, f"{set_name}-prediction-{chosen}")
    prediction_metrics, method = _prediction_from_pickle(pickled)
    if prediction_metrics is None:
        prediction_metrics, method = parse_prediction_log(log) if log else ({}, None)
    settings["prediction_method"] = method or chosen.split("_")[0]
    settings["prediction"] = chosen

    return ScvaeRun(path=folder, settings=settings, cluster_ids=cluster_ids,
                    predicted_labels=predicted_labels, latent_z=latent_z, latent_y=latent_y,
                    metrics=metrics, prediction_metrics=prediction_metrics)


def scvae_level_scores(run, hierarchy, labels):
    """Our per-level scores of scVAE's own cluster ids, cells matched to `labels` by id."""
    labels = pd.Series(labels)
    labels.index = labels.index.astype(str)
    if labels.index.has_duplicates:
        raise ScvaeRunError("the labels' cell ids are not unique")
    cells = run.cluster_ids.index
    found = cells.isin(labels.index)
    n_found, n_cells = int(found.sum()), len(cells)
    if n_found < MIN_MATCHED * n_cells:
        missing = list(cells[~found][:3])
        raise ScvaeRunError(
            f"only {n_found} of the run's {n_cells} cells are among the {len(labels)} labelled "
            f"cells (need {MIN_MATCHED:.0%}); e.g. missing {missing}. Are the labels indexed by "
            f"the same cell ids (obs_names) as the data scVAE was run on?")
    clusters = run.cluster_ids[found]
    df = level_scores(hierarchy, labels.loc[clusters.index].to_numpy(), clusters.to_numpy())
    df.attrs.update(n_cells=n_found, n_run_cells=n_cells)
    return df
