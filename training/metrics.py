"""Classification metrics the papers report, and their summary over folds.

Accuracy; per-class, macro and weighted precision, recall and F1; one-vs-rest
ROC AUC per class and macro; the confusion matrix; and the RSNA 2024
sample-weighted log loss (weights 1, 2, 4 for the three grades in increasing
severity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve

from training.errors import DataError

#: RSNA 2024 sample weights for normal/mild, moderate, severe.
RSNA_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)


def weighted_log_loss(y_true: np.ndarray, probs: np.ndarray, weights: Sequence[float] = RSNA_WEIGHTS) -> float:
    """Sample-weighted log loss: each sample weighs ``weights[true class]``.

    Probabilities are renormalised per row and clipped to [1e-15, 1] as the
    competition's metric does.

    Raises
    ------
    DataError
        If the number of weights differs from the number of classes.
    """
    p = np.asarray(probs, float)
    if p.shape[1] != len(weights):
        raise DataError(f"weights: {len(weights)} weights for {p.shape[1]} classes")
    p = p / p.sum(axis=1, keepdims=True)
    y = np.asarray(y_true, int)
    w = np.asarray(weights, float)[y]
    ll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0))
    return float((w * ll).sum() / w.sum())


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Every metric for one evaluation, as a JSON-ready dict.

    Parameters
    ----------
    y_true : sequence of int
        True class indices.
    probs : np.ndarray
        ``[N, C]`` predicted probabilities.
    class_names : sequence of str
        Names of the ``C`` classes.

    Raises
    ------
    DataError
        If shapes disagree or there are no samples.
    """
    y = np.asarray(y_true, int)
    p = np.asarray(probs, float)
    k = len(class_names)
    if p.ndim != 2 or p.shape != (len(y), k) or len(y) == 0:
        raise DataError(f"probs: expected [{len(y)}, {k}] with N > 0, got {p.shape}")
    pred = p.argmax(axis=1)
    labels = list(range(k))
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "per_class": {
            c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i])}
            for i, c in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
    for avg in ("macro", "weighted"):
        pr, rc, f, _ = precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(pr), float(rc), float(f)
    aucs = {}
    for i, c in enumerate(class_names):
        pos = y == i
        # AUC is undefined when a class is absent or the only one present
        aucs[c] = float(roc_auc_score(pos, p[:, i])) if 0 < pos.sum() < len(y) else math.nan
        out["per_class"][c]["auc"] = aucs[c]
    finite = [a for a in aucs.values() if not math.isnan(a)]
    out["macro_auc"] = float(np.mean(finite)) if finite else math.nan
    if k == len(RSNA_WEIGHTS):
        out["rsna_weighted_log_loss"] = weighted_log_loss(y, p)
    out["log_loss"] = weighted_log_loss(y, p, [1.0] * k)
    return out


def roc_curves(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest ROC curve ``(fpr, tpr)`` per class that has positives and negatives."""
    y = np.asarray(y_true, int)
    p = np.asarray(probs, float)
    out = {}
    for i, c in enumerate(class_names):
        pos = y == i
        if 0 < pos.sum() < len(y):
            fpr, tpr, _ = roc_curve(pos, p[:, i])
            out[c] = (fpr, tpr)
    return out


#: Scalar metrics summarised over folds.
SCALARS: tuple[str, ...] = (
    "accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall",
    "weighted_f1", "macro_auc", "rsna_weighted_log_loss", "log_loss",
)


def summarize_folds(folds: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each scalar metric over folds.

    Raises
    ------
    DataError
        If ``folds`` is empty.
    """
    if not folds:
        raise DataError("folds: nothing to summarise")
    out = {}
    for key in SCALARS:
        vals = np.array([f[key] for f in folds if key in f and not math.isnan(f[key])], float)
        if len(vals):
            out[key] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                        "n_folds": int(len(vals))}
    return out
