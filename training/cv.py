"""Stratified k-fold cross-validation grouped by patient, and the folds' training runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from models.preprocess import Preprocessor
from models.registry import Classifier
from training.datasets import CropDataset, CropSet
from training.errors import DataError
from training.loop import FitResult, TrainSettings, fit, predict_probs, seed_everything
from training.metrics import classification_metrics, summarize_folds


def make_folds(crops: CropSet, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_index, val_index)`` per fold: stratified by label, a patient never in two folds.

    ``k == 1`` gives one 80:20 split (the first of five folds).

    Raises
    ------
    DataError
        If ``k`` is below 1 or there are fewer patients than folds.
    """
    if k < 1:
        raise DataError(f"k: must be >= 1, got {k}")
    splits = max(k, 5) if k == 1 else k
    n_groups = len(np.unique(crops.groups))
    if n_groups < splits:
        raise DataError(f"k: {splits} folds need at least {splits} patients, got {n_groups}")
    sgkf = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    folds = list(sgkf.split(np.zeros(len(crops)), crops.labels, crops.groups))
    return folds[:1] if k == 1 else folds


@dataclass
class FoldRun:
    """One fold: its metrics on the validation part, its history and best weights."""

    index: int
    metrics: dict[str, Any]
    fit: FitResult
    val_index: np.ndarray
    val_probs: np.ndarray


@dataclass
class CVResult:
    """All folds, the summary (mean, sd) and the index of the best fold (lowest validation loss)."""

    folds: list[FoldRun]
    summary: dict[str, dict[str, float]]
    best: int
    extra: dict[str, Any] = field(default_factory=dict)


def cross_validate(
    crops: CropSet,
    build: Callable[[], Classifier],
    preprocess: Preprocessor,
    settings: TrainSettings,
    k: int = 5,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> CVResult:
    """Train one model per fold and evaluate it on the held-out fold.

    Parameters
    ----------
    crops : CropSet
        All training data.
    build : callable
        Returns a fresh model (random init) per fold.
    preprocess : Preprocessor
        The model's preprocessing.
    settings : TrainSettings
        Training settings; each fold is seeded with ``settings.seed + fold``.
    k : int
        Number of folds (1: a single 80:20 split).
    checkpoint_dir : path, optional
        Where per-fold checkpoints go (needed for ``resume``).
    resume : bool
        Continue interrupted folds from their checkpoints.
    """
    runs = []
    for i, (tr, va) in enumerate(make_folds(crops, k, settings.seed)):
        fold_settings = TrainSettings(**{**settings.to_dict(), "seed": settings.seed + i})
        seed_everything(fold_settings.seed)  # the fold's initial weights depend on its seed only
        model = build()
        train_ds = CropDataset(crops.subset(tr), preprocess)
        val_ds = CropDataset(crops.subset(va), preprocess)
        ckpt = Path(checkpoint_dir) / f"fold{i + 1}.pt" if checkpoint_dir else None
        result = fit(model, train_ds, val_ds, fold_settings, ckpt, resume, desc=f"fold {i + 1}/{max(k, 1)}")
        probs = predict_probs(model, val_ds)
        metrics = classification_metrics(crops.labels[va], probs, crops.class_names)
        metrics["best_epoch"] = result.best_epoch
        runs.append(FoldRun(i, metrics, result, va, probs))
    summary = summarize_folds([r.metrics for r in runs])
    best = int(np.argmin([min(r.fit.history["val_loss"]) if r.fit.history["val_loss"] else np.inf for r in runs]))
    return CVResult(runs, summary, best)
