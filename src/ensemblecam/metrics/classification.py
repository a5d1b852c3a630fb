"""Classifier metrics of lesion probabilities (class index 1 = lesion).

A slice is predicted positive when ``prob >= threshold``; precision, recall and F1 are 0
when their denominator is 0 (sklearn's ``zero_division=0``); AUROC by the rank-sum formula.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties averaged.

    AUROC = (sum of positive ranks - P (P + 1) / 2) / (P N); NaN if either class is absent.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classifier_metrics(
    y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, AUROC and confusion matrix of lesion probabilities.

    Predicted positive = ``prob >= threshold``; precision (recall, F1) is 0 when there is
    no predicted (true) positive, as sklearn's ``zero_division=0``. ``confusion`` is
    [[tn, fp], [fn, tp]] (rows = truth, columns = prediction, as sklearn).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values, prob has {p.size}")
    pred = p >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "accuracy": (tp + tn) / y.size if y.size else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": auroc(y, p),
        "confusion": [[tn, fp], [fn, tp]],
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }  # fmt: skip
