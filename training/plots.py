"""PNG plots a person would rather look at: confusion matrix, ROC curves, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training.metrics import roc_curves  # noqa: E402


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix (rows: truth, columns: prediction) with counts and row fractions."""
    m = np.asarray(matrix, float)
    frac = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(class_names), 1.2 + 1.0 * len(class_names)))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}\n{frac[i, j]:.0%}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_roc(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str], path: str | Path,
             aucs: dict[str, float] | None = None, title: str = "") -> Path:
    """One-vs-rest ROC curve per class."""
    curves = {(f"{c} (AUC {aucs[c]:.3f})" if aucs and c in aucs else c): fpr_tpr
              for c, fpr_tpr in roc_curves(y_true, probs, class_names).items()}
    return plot_roc_curves(curves, path, title or "ROC, one vs rest")


def plot_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """ROC curves ``label -> (false positive rate, true positive rate)`` in one figure."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_history(histories: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Training and validation loss and validation accuracy per epoch, one line per fold."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, h in enumerate(histories):
        ep = np.arange(1, len(h["train_loss"]) + 1)
        a1.plot(ep, h["train_loss"], color=f"C{i}", label=f"fold {i + 1} train")
        if h.get("val_loss"):
            a1.plot(ep, h["val_loss"], "--", color=f"C{i}", label=f"fold {i + 1} val")
        if h.get("val_accuracy"):
            a2.plot(ep, h["val_accuracy"], color=f"C{i}", label=f"fold {i + 1}")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend(fontsize=7)
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation accuracy")
    a2.set_ylim(0, 1.02)
    fig.suptitle(title or "training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
