"""From crops to an installed model package: cross-validate, pick, evaluate, plot, card, export.

:func:`train_task` is what ``discus train <task>`` runs; :func:`evaluate_package`
is what ``discus evaluate <task>`` runs on a held-out set.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.calibration import calibration_summary, log_probs
from models.config import ModelConfig
from models.package import save_package
from models.predictor import Predictor
from models.preprocess import Preprocessor
from models.registry import Classifier, create_model, model_entry
from training.cards import write_card
from training.cv import CVResult, cross_validate
from training.datasets import CropSet
from training.errors import DataError
from training.loop import TrainSettings, resolve_device
from training.metrics import classification_metrics
from training.plots import plot_confusion, plot_history, plot_roc
from training.tasks import task_spec

#: Where an architecture's small configuration is explained in the card.
SMALL_NOTE = (
    "a reduced configuration of the architecture ({kwargs}) is shipped for the demo; the full "
    "configuration (for vit_ldh the published one of paper A) is the default `discus train` uses for sites"
)


def clean(o: Any) -> Any:
    """JSON-safe copy: NaN becomes None, numpy scalars become Python numbers."""
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if math.isnan(float(o)) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o


def model_kwargs_for(architecture: str, small: bool, input_px: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Builder arguments recorded in the config (small configuration merged, ViT image size set)."""
    kw = {**(model_entry(architecture).small_kwargs if small else {}), **(extra or {})}
    if architecture == "vit_ldh":
        kw["img_size"] = input_px
    return kw


def _predict(model: Classifier, config: ModelConfig, crops: CropSet) -> np.ndarray:
    return Predictor(model, config, device="cpu" if not torch.cuda.is_available() else None,
                     batch_size=64).predict(crops.images)


def evaluation_plots(out_dir: Path, metrics: dict[str, Any], y: np.ndarray, probs: np.ndarray,
                     class_names: list[str], prefix: str, title: str) -> list[Path]:
    """Confusion matrix and ROC plots of one evaluation."""
    return [
        plot_confusion(metrics["confusion_matrix"], class_names, out_dir / f"{prefix}_confusion.png", title),
        plot_roc(y, probs, class_names, out_dir / f"{prefix}_roc.png",
                 {c: metrics["per_class"][c]["auc"] for c in class_names}, title),
    ]


def train_task(
    task: str,
    crops: CropSet,
    out_dir: str | Path,
    architecture: str,
    settings: TrainSettings,
    *,
    small: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    explain: dict[str, Any] | None = None,
    folds: int = 5,
    holdout: CropSet | None = None,
    version: str = "0.1.0",
    name: str | None = None,
    fp16: bool = True,
    synthetic: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[ModelConfig, CVResult]:
    """Cross-validate an architecture on ``crops`` and export the best fold's model as a package.

    Parameters
    ----------
    task : str
        Task name (:data:`training.tasks.TASKS`); gives classes and preprocessing.
    crops : CropSet
        Training data (raw crops as the pipeline cuts them).
    out_dir : path
        Package directory to write.
    architecture : str
        Registered architecture.
    settings : TrainSettings
        Training settings.
    small : bool
        Use the architecture's reduced configuration (said so in the card).
    model_kwargs : dict, optional
        Extra builder arguments.
    explain : dict, optional
        The config's Grad-CAM settings (default: multi-layer for ``vit_ldh`` only).
    folds : int
        Cross-validation folds (1: one 80:20 split).
    holdout : CropSet, optional
        Data never used in training; its metrics become the package's metrics.
    version, name : str
        Package version and name (default ``discus-<task>``).
    fp16 : bool
        Store weights in half precision.
    synthetic : bool
        The data are synthetic: the card says trained on synthetic data only, not for clinical use.
    checkpoint_dir : path, optional
        Per-fold checkpoints (for ``resume``).
    resume : bool
        Continue interrupted folds.

    Raises
    ------
    DataError
        If the crops' classes are not the task's classes.
    """
    spec = task_spec(task)
    if list(crops.class_names) != list(spec.class_names):
        raise DataError(f"crops: classes {crops.class_names} are not the classes of {task} {list(spec.class_names)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    crop_px = int(crops.images.shape[1])
    kwargs = model_kwargs_for(architecture, small, crop_px, model_kwargs)
    preprocessing = {**spec.preprocessing, "crop_px": crop_px}
    draft = ModelConfig(
        name=name or f"discus-{task.replace('_', '-')}", architecture=architecture, task=task, version=version,
        input_size=(crop_px, crop_px), in_chans=1, class_names=list(spec.class_names),
        preprocessing=preprocessing, model_kwargs=kwargs,
        explain=dict(explain) if explain is not None else {"multilayer": architecture == "vit_ldh"},
    )
    pre = Preprocessor.from_config(draft)

    def build() -> Classifier:
        return create_model(architecture, **draft.builder_kwargs())

    t0 = time.perf_counter()
    cv = cross_validate(crops, build, pre, settings, folds, checkpoint_dir, resume)
    seconds = time.perf_counter() - t0
    model = build()
    model.load_state_dict(cv.folds[cv.best].fit.best_state)
    model.eval()
    histories = [f.fit.history for f in cv.folds]
    plots = [plot_history(histories, out / "training_curves.png", f"{task}: {architecture}")]
    # pooled out-of-fold predictions: every training crop scored by the fold that did not train on it
    oof_idx = np.concatenate([f.val_index for f in cv.folds])
    oof_probs = np.concatenate([f.val_probs for f in cv.folds])
    oof = classification_metrics(crops.labels[oof_idx], oof_probs, crops.class_names)
    plots += evaluation_plots(out, oof, crops.labels[oof_idx], oof_probs, crops.class_names, "cv",
                              f"{task}: cross-validation (out of fold)")
    evaluation: dict[str, Any] = {"cv_out_of_fold": clean(oof)}
    metrics = {k: v["mean"] for k, v in cv.summary.items()}
    metrics_source = "cross-validation mean"
    if holdout is not None and len(holdout):
        probs = _predict(model, draft, holdout)
        held = classification_metrics(holdout.labels, probs, holdout.class_names)
        plots += evaluation_plots(out, held, holdout.labels, probs, holdout.class_names, "holdout",
                                  f"{task}: held-out")
        evaluation["holdout"] = clean(held)
        evaluation["holdout_data"] = holdout.summary()
        metrics = {k: held[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc",
                                        "weighted_f1", "rsna_weighted_log_loss", "log_loss", "n") if k in held}
        metrics_source = "held-out set"
    metrics["source"] = metrics_source
    evaluation["plots"] = [Path(p).name for p in plots]  # beside the card
    device = resolve_device(settings.device)
    training = {
        "task_description": spec.description,
        "data": crops.summary(),
        "synthetic": synthetic,
        "strategy": settings.strategy,
        "init": settings.init,
        "folds": folds,
        "seed": settings.seed,
        "epochs": settings.epochs,
        "best_epochs": [f.fit.best_epoch for f in cv.folds],
        "exported_fold": cv.best + 1,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "class_weighting": settings.class_weighting,
        "augmentation": settings.augmentation,
        "cv_summary": cv.summary,
        "train_seconds": round(seconds, 1),
        "device": f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(
            torch.cuda.get_device_name(device)),
        "fp16_weights": fp16,
    }
    if small:
        training["architecture_note"] = SMALL_NOTE.format(kwargs=kwargs)
    y_oof = crops.labels[oof_idx]
    calibration = calibration_summary(log_probs(oof_probs), y_oof)
    evaluation["calibration"] = clean(calibration)
    provenance = {
        "training_data": [{"name": str(crops.summary()["source"]), "kind": "synthetic" if synthetic else "real",
                           "cases": int(crops.summary()["n_groups"])}],
        "validation": {
            "method": "held-out" if metrics_source == "held-out set" else "internal cross-validation",
            "description": metrics_source if metrics_source == "held-out set" else
            f"{folds}-fold cross-validation grouped by case (mean over folds)",
            "figures": {k: metrics[k] for k in ("accuracy", "macro_f1", "macro_auc", "n") if k in metrics},
        },
        "domain": {"modality": spec.modality, "body_part": "lumbar spine", "task": spec.description},
    }
    config = ModelConfig(**{**draft.to_dict(), "training": clean(training), "metrics": clean(metrics),
                            "provenance": clean(provenance), "calibration": clean(calibration)})
    final = save_package(model, config, out, fp16=fp16)
    write_card(out, final, evaluation)
    return final, cv


def evaluate_package(path: str | Path, crops: CropSet, out_dir: str | Path, device: str | None = None) -> dict[str, Any]:
    """Evaluate an installed package on labelled crops; writes plots and ``evaluation.json`` to ``out_dir``.

    Raises
    ------
    DataError
        If the crops' classes differ from the package's.
    PackageError
        If the package does not verify.
    """
    import json

    pred = Predictor.from_package(path, device=device)
    if list(crops.class_names) != pred.class_names:
        raise DataError(f"crops: classes {crops.class_names} differ from the package's {pred.class_names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    probs = pred.predict(crops.images)
    seconds = time.perf_counter() - t0
    m = classification_metrics(crops.labels, probs, crops.class_names)
    plots = evaluation_plots(out, m, crops.labels, probs, crops.class_names, "evaluation",
                             f"{pred.config.task}: {crops.source or 'evaluation'}")
    report = clean({"package": pred.config.name, "version": pred.config.version, "sha256": pred.config.sha256,
                    "data": crops.summary(), "metrics": m, "inference_seconds": seconds,
                    "plots": [Path(p).name for p in plots]})
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return report
