"""How well call probabilities match how often the calls are right (numpy only, so the scvi-tools
venv's scanvi_calibration.py scores scANVI exactly as calibration.py scores TreeVAE)."""
import numpy as np

THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)
BINS = 15


def calibration(correct, probability) -> dict:
    """Accuracy, mean probability, expected calibration error and the accuracy of the surest calls."""
    edges = np.linspace(0, 1, BINS + 1)
    bins = np.clip(np.digitize(probability, edges[1:-1]), 0, BINS - 1)
    ece = sum(abs(correct[bins == b].mean() - probability[bins == b].mean()) * (bins == b).mean()
              for b in range(BINS) if (bins == b).any())
    sure = probability >= 0.9
    return {"accuracy": float(correct.mean()), "mean_probability": float(probability.mean()), "ece": float(ece),
            "share_at_least_0.9": float(sure.mean()),
            "accuracy_at_least_0.9": float(correct[sure].mean()) if sure.any() else None}


def rows(truth, names, probability, levels) -> list:
    """One row per level: calibration of the calls, then coverage and accuracy per threshold."""
    out = []
    for i, level in enumerate(levels):
        correct = names[:, i] == truth[:, i]
        row = {"level": level, **calibration(correct, probability[:, i])}
        for t in THRESHOLDS:
            named = (probability[:, :i + 1] >= t).all(axis=1)
            row[f"named_{t}"] = float(named.mean())
            row[f"accuracy_named_{t}"] = float(correct[named].mean()) if named.any() else None
        out.append(row)
    return out
