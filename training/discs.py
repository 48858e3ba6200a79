"""Disc grading from real patients: the SPIDER-format data, cross-validation, calibration, package.

Data (the format of ``spider-sagittal``): ``images/<series>.png`` (one upright mid-sagittal
image per series), ``series.csv`` (``series``, ``patient``, ``kind``, ``Manufacturer``,
``PixelSpacing`` ...) and ``gradings.csv`` (per patient and disc: ``IVD label`` 1 = L5-S1
counting up, Pfirrmann grade and the binary findings). A patient's gradings hold for all of
his series.

Disc positions are not in the data: every image goes through the product's level localizer
(as a stack of the repeated image, :func:`models.disc_grading.image_volume`) and every named
lumbar disc is cropped with :func:`models.disc_grading.disc_crop`, the function inference
uses. The images carry no orientation; they are read anterior-left, as the data set's images
are stored (trying the mirrored reading as well named levels on posterior elements of
anterior-left images, so it is not done). Discs the localizer does not name are not used for
training, and are reported with the reason.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from models.config import ModelConfig
from models.crops import CROP_SPECS
from models.disc_grading import (
    BINARY_HEADS,
    HEADS,
    LUMBAR_DISCS,
    OUTPUT_NAMES,
    PFIRRMANN_GRADES,
    TASK,
    DiscGrader,
    disc_crop,
    head_probabilities,
    image_volume,
    split_logits,
)
from models.localizer import LevelLocalizer
from models.preprocess import Preprocessor
from models.registry import Classifier, create_model
from training.augment import Augmenter
from training.cv import make_folds
from training.datasets import CropDataset, CropSet
from training.errors import DataError
from training.loop import TrainSettings, class_weights, resolve_device, seed_everything

#: Columns of ``gradings.csv`` per binary head; Modic counts any type (1-3) as present.
GRADING_COLUMNS: dict[str, str] = {
    "herniation": "Disc herniation", "bulging": "Disc bulging", "narrowing": "Disc narrowing",
    "spondylolisthesis": "Spondylolisthesis", "modic": "Modic", "endplate_upper": "UP endplate",
    "endplate_lower": "LOW endplate",
}
#: Disc level of each IVD label (1 = L5-S1, counting up).
IVD_LEVELS: dict[int, str] = {1: "L5-S1", 2: "L4-L5", 3: "L3-L4", 4: "L2-L3", 5: "L1-L2", 6: "T12-L1",
                              7: "T11-T12", 8: "T10-T11", 9: "T9-T10"}
#: Contrast names of the ``kind`` column.
CONTRASTS: dict[str, str] = {"t1": "T1", "t2": "T2", "t2_SPACE": "T2 SPACE"}
#: Crop side in pixels (also the network input).
CROP_PX = 64
#: The shipped network: the registry's ResNet18 at reduced width.
ARCHITECTURE = "resnet18"
MODEL_KWARGS: dict[str, Any] = {"channels": [16, 32, 64, 128], "stem_width": 16}
PREPROCESSING: dict[str, Any] = {"mode": "percentile", "low": 0.5, "high": 99.5, "mean": 0.5, "std": 0.25,
                                 "crop_px": CROP_PX}
#: Training augmentation: no flips (they would swap upper and lower endplates, or the
#: anterior and posterior margins); small rotations, zoom, shifts and intensity jitter.
AUGMENT = Augmenter(rotate_deg=10.0, scale=(0.9, 1.1), translate=0.06, brightness=0.1, contrast=0.2)


# --------------------------------------------------------------------------- data


@dataclass
class Series:
    """One image of the data set and what ``series.csv`` says about it."""

    series: str
    patient: str
    kind: str
    vendor: str
    pixel_spacing: tuple[float, float]
    path: Path


def _spacing(text: str) -> tuple[float, float]:
    vals = [float(v) for v in text.strip().strip("[]").split(",")]
    if len(vals) != 2 or min(vals) <= 0:
        raise DataError(f"PixelSpacing: expected [row, column] mm, got {text!r}")
    return vals[0], vals[1]


def load_series(data_dir: str | Path) -> list[Series]:
    """The rows of ``series.csv`` whose image exists.

    Raises
    ------
    DataError
        If ``series.csv`` is missing or lacks a needed column.
    """
    root = Path(data_dir)
    path = root / "series.csv"
    if not path.is_file():
        raise DataError(f"data_dir: no series.csv in {root}")
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                img = root / "images" / f"{row['series']}.png"
                if img.is_file():
                    vendor = "Siemens" if "siemens" in row["Manufacturer"].lower() else (
                        "Philips" if "philips" in row["Manufacturer"].lower() else row["Manufacturer"])
                    out.append(Series(row["series"], str(row["patient"]), row["kind"], vendor,
                                      _spacing(row["PixelSpacing"]), img))
            except KeyError as exc:
                raise DataError(f"series.csv: missing column {exc}") from None
    return out


def load_gradings(data_dir: str | Path) -> dict[tuple[str, int], dict[str, int]]:
    """``(patient, IVD label) -> {"pfirrmann": 1-5, "herniation": 0/1, ...}`` from ``gradings.csv``.

    Raises
    ------
    DataError
        If ``gradings.csv`` is missing or lacks a needed column.
    """
    path = Path(data_dir) / "gradings.csv"
    if not path.is_file():
        raise DataError(f"data_dir: no gradings.csv in {Path(data_dir)}")
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                g = {"pfirrmann": int(row["Pfirrman grade"])}
                g.update({h: int(int(row[c]) > 0) for h, c in GRADING_COLUMNS.items()})
                out[(str(row["Patient"]), int(row["IVD label"]))] = g
            except KeyError as exc:
                raise DataError(f"gradings.csv: missing column {exc}") from None
    return out


def read_image(path: str | Path) -> np.ndarray:
    """An 8-bit image as float32 grey (colour images averaged)."""
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def locate(localizer: LevelLocalizer, image: np.ndarray, spacing: Sequence[float], anterior_left: bool = True
           ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, str]:
    """Lumbar disc points of one image: ``(name -> mm, array, affine, reason)``.

    ``reason`` is the localizer's when no lumbar disc was named ("" otherwise).
    """
    array, affine = image_volume(image, spacing, anterior_left=anterior_left)
    res = localizer(array, affine)
    pts = {p.name: np.asarray(p.point_mm, float) for p in res.points if p.name in LUMBAR_DISCS}
    reason = "" if pts else (res.reason or "no lumbar disc named")
    return pts, array, affine, reason


@dataclass
class DiscRecord:
    """One labelled lumbar disc of one series: where it was found, or why not."""

    series: str
    patient: str
    kind: str
    vendor: str
    ivd_label: int
    level: str
    located: bool
    reason: str
    point_px: tuple[float, float] | None  # (row, column) in the image
    labels: dict[str, int]


def build_crops(data_dir: str | Path, localizer: LevelLocalizer, out_px: int = CROP_PX,
                progress: bool = True) -> tuple[CropSet, list[DiscRecord]]:
    """Crops of every located, graded lumbar disc, and a record of every graded lumbar disc.

    The crop set's labels are the Pfirrmann grade minus one (what the folds are stratified
    by), its groups the patients; each crop's ``meta`` holds the series, contrast, vendor,
    level and all labels.
    """
    series = load_series(data_dir)
    grads = load_gradings(data_dir)
    crops, labels, groups, meta, records = [], [], [], [], []
    for s in tqdm(series, desc="locate", disable=not progress, leave=False):
        wanted = [(ivd, IVD_LEVELS[ivd]) for ivd in range(1, 6) if (s.patient, ivd) in grads]
        if not wanted:
            continue
        image = read_image(s.path)
        pts, array, affine, reason = locate(localizer, image, s.pixel_spacing)
        inv = np.linalg.inv(affine)
        for ivd, level in wanted:
            g = grads[(s.patient, ivd)]
            p = pts.get(level)
            px = None
            if p is not None:
                vox = inv[:3, :3] @ p + inv[:3, 3]
                px = (float(vox[1]), float(vox[0]))
                crop, _, _ = disc_crop(array, affine, p, out_px)
                crops.append(crop)
                labels.append(g["pfirrmann"] - 1)
                groups.append(s.patient)
                meta.append({"series": s.series, "patient": s.patient, "kind": s.kind, "vendor": s.vendor,
                             "level": level, "ivd_label": ivd, **g})
            why = "" if p is not None else (reason or f"{level} not named (other lumbar discs were)")
            records.append(DiscRecord(s.series, s.patient, s.kind, s.vendor, ivd, level, p is not None, why,
                                      px, g))
    if not crops:
        raise DataError(f"data_dir: no disc of {data_dir} was located")
    names = [f"pfirrmann_{g}" for g in PFIRRMANN_GRADES]
    return CropSet(np.stack(crops), np.asarray(labels), np.asarray(groups), names, meta,
                   "SPIDER lumbar MRI (training patients), mid-sagittal images"), records


def targets_of(crops: CropSet) -> np.ndarray:
    """``[N, 7]`` float binary targets in :data:`BINARY_HEADS` order."""
    return np.asarray([[m[h] for h in BINARY_HEADS] for m in crops.meta], dtype=np.float32)


# --------------------------------------------------------------------------- training


def build_model(seed: int) -> Classifier:
    """The shipped architecture with random weights drawn from ``seed``."""
    seed_everything(seed)
    return create_model(ARCHITECTURE, num_classes=len(OUTPUT_NAMES), in_chans=1, **MODEL_KWARGS)


def preprocessor() -> Preprocessor:
    return Preprocessor(PREPROCESSING, (CROP_PX, CROP_PX), 1)


def multi_head_loss(logits: torch.Tensor, grade: torch.Tensor, findings: torch.Tensor,
                    grade_weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the Pfirrmann head plus the mean binary cross-entropy of the findings."""
    k = len(PFIRRMANN_GRADES)
    ce = F.cross_entropy(logits[:, :k], grade, weight=grade_weights)
    bce = F.binary_cross_entropy_with_logits(logits[:, k:], findings)
    return ce + bce


@torch.no_grad()
def predict_logits(model: Classifier, data: CropDataset, batch_size: int = 128) -> np.ndarray:
    """Network outputs ``[N, 12]`` for a dataset (no augmentation)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(data.batch(torch.arange(i, min(i + batch_size, len(data))), train=False)[0].to(device)).float().cpu()
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(OUTPUT_NAMES)), np.float32)


def _loss_of(logits: np.ndarray, grade: np.ndarray, findings: np.ndarray) -> float:
    z = torch.as_tensor(logits)
    return float(multi_head_loss(z, torch.as_tensor(grade), torch.as_tensor(findings), None))


def fit_heads(model: Classifier, train: CropDataset, train_findings: np.ndarray, val: CropDataset | None,
              val_findings: np.ndarray | None, settings: TrainSettings, desc: str = "train") -> dict[str, Any]:
    """Train the multi-head network in place (Adam, ReduceLROnPlateau, early stopping on validation loss).

    Without a validation set it trains ``settings.epochs`` epochs and keeps the last weights.
    Returns the history and the best epoch.
    """
    torch.set_num_threads(settings.threads)
    seed_everything(settings.seed)
    device = resolve_device(settings.device)
    model.to(device)
    train.augment = AUGMENT
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=settings.plateau_factor,
                                                       patience=settings.plateau_patience, min_lr=settings.min_lr)
    weights = class_weights(train.labels, len(PFIRRMANN_GRADES)).to(device) if settings.class_weighting else None
    yb = torch.as_tensor(train_findings, dtype=torch.float32)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_accuracy": [], "lr": []}
    best_loss, best_epoch, bad = math.inf, 0, 0
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(settings.epochs), desc=desc, disable=not settings.progress, leave=False)
    for epoch in bar:
        model.train()
        gen = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            if len(idx) < 2:
                continue  # a batch of one breaks batch normalisation
            x, y = train.batch(idx, train=True, generator=gen)
            loss = multi_head_loss(model(x.to(device)).float(), y.to(device), yb[idx].to(device), weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history["train_loss"].append(total / max(count, 1))
        history["lr"].append(opt.param_groups[0]["lr"])
        if val is not None and val_findings is not None and len(val):
            z = predict_logits(model, val)
            monitor = _loss_of(z, val.labels.numpy(), val_findings)
            history["val_loss"].append(monitor)
            history["val_accuracy"].append(float((z[:, :len(PFIRRMANN_GRADES)].argmax(1) == val.labels.numpy()).mean()))
        else:
            monitor = history["train_loss"][-1]
        sched.step(monitor)
        if val is None:
            best_epoch = epoch + 1
        elif monitor < best_loss - 1e-4:
            best_loss, best_epoch, bad = monitor, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", val=f"{monitor:.3f}")
        if val is not None and bad >= settings.patience:
            break
    if val is not None:
        model.load_state_dict(best_state)
    return {"history": history, "best_epoch": best_epoch}


def cross_validate(crops: CropSet, settings: TrainSettings, k: int = 5,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Patient-grouped folds stratified by Pfirrmann grade; out-of-fold logits of every crop."""
    findings = targets_of(crops)
    pre = preprocessor()
    oof = np.zeros((len(crops), len(OUTPUT_NAMES)), np.float32)
    fold_of = np.zeros(len(crops), int)
    runs = []
    for i, (tr, va) in enumerate(make_folds(crops, k, settings.seed)):
        t0 = time.time()
        model = build_model(settings.seed + i)
        fs = TrainSettings(**{**settings.to_dict(), "seed": settings.seed + i})
        run = fit_heads(model, CropDataset(crops.subset(tr), pre), findings[tr], CropDataset(crops.subset(va), pre),
                        findings[va], fs, desc=f"fold {i + 1}/{k}")
        oof[va] = predict_logits(model, CropDataset(crops.subset(va), pre))
        fold_of[va] = i
        run["seconds"] = round(time.time() - t0, 1)
        run["prevalence"] = findings[tr].mean(axis=0).tolist()
        runs.append(run)
        log(f"fold {i + 1}/{k}: best epoch {run['best_epoch']}, {run['seconds']} s, "
            f"val loss {min(run['history']['val_loss']):.3f}")
    return {"oof_logits": oof, "fold": fold_of, "runs": runs}


# --------------------------------------------------------------------------- metrics


def binary_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature of a sigmoid head: the two-class softmax of ``[0, z]`` is ``sigmoid(z)``."""
    from models.calibration import fit_temperature

    z = np.asarray(logits, float)
    return fit_temperature(np.stack([np.zeros_like(z), z], axis=1), np.asarray(labels, int))


def calibrate(logits: np.ndarray, grade: np.ndarray, findings: np.ndarray) -> dict[str, Any]:
    """Temperature per head on out-of-fold logits, with ECE and NLL before and after."""
    from models.calibration import calibration_summary

    heads = split_logits(logits)
    out = {"pfirrmann": calibration_summary(heads["pfirrmann"], grade)}
    for j, h in enumerate(BINARY_HEADS):
        z = heads[h]
        out[h] = calibration_summary(np.stack([np.zeros_like(z), z], axis=1), findings[:, j].astype(int))
    return out


def disc_metrics(grade: np.ndarray, findings: np.ndarray, probs: dict[str, np.ndarray],
                 thresholds: dict[str, float]) -> dict[str, Any]:
    """The issue's figures for one set of discs.

    Pfirrmann: balanced accuracy, exact agreement, agreement within one grade, Cohen's
    kappa (unweighted and linear-weighted), confusion matrix. Each finding: AUC (when both
    classes occur), balanced accuracy, sensitivity and specificity at its threshold.
    ``grade`` is 0-4, ``findings`` ``[N, 7]``.
    """
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, confusion_matrix, roc_auc_score

    y = np.asarray(grade, int)
    pred = probs["pfirrmann"].argmax(1)
    out: dict[str, Any] = {"n_discs": int(len(y))}
    if len(y):
        out["pfirrmann"] = {
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "exact": float((pred == y).mean()),
            "within_one": float((np.abs(pred - y) <= 1).mean()),
            "kappa": float(cohen_kappa_score(y, pred)) if len(set(y) | set(pred)) > 1 else math.nan,
            "kappa_linear": float(cohen_kappa_score(y, pred, weights="linear")) if len(set(y) | set(pred)) > 1 else math.nan,
            "confusion_matrix": confusion_matrix(y, pred, labels=list(range(len(PFIRRMANN_GRADES)))).tolist(),
            "support": np.bincount(y, minlength=len(PFIRRMANN_GRADES)).tolist(),
        }
    for j, h in enumerate(BINARY_HEADS):
        t = np.asarray(findings[:, j], int)
        p = probs[h]
        hit = p >= thresholds[h]
        pos, neg = t == 1, t == 0
        m: dict[str, Any] = {"positives": int(pos.sum()), "n": int(len(t)), "threshold": float(thresholds[h])}
        m["auc"] = float(roc_auc_score(t, p)) if pos.any() and neg.any() else math.nan
        sens = float(hit[pos].mean()) if pos.any() else math.nan
        spec = float((~hit[neg]).mean()) if neg.any() else math.nan
        m["sensitivity"], m["specificity"] = sens, spec
        m["balanced_accuracy"] = float(np.nanmean([sens, spec])) if pos.any() or neg.any() else math.nan
        out[h] = m
    return out


#: The issue's bar (patient-grouped 5-fold cross-validation).
BAR: dict[str, tuple[str, str, float]] = {
    "Pfirrmann balanced accuracy": ("pfirrmann", "balanced_accuracy", 0.78),
    "Pfirrmann within one grade": ("pfirrmann", "within_one", 0.99),
    "herniation AUC": ("herniation", "auc", 0.90),
    "bulging AUC": ("bulging", "auc", 0.80),
    "spondylolisthesis AUC": ("spondylolisthesis", "auc", 0.90),
    "Modic balanced accuracy": ("modic", "balanced_accuracy", 0.86),
}


def bar_figures(m: dict[str, Any]) -> dict[str, float]:
    """The bar's figures of a :func:`disc_metrics` result."""
    return {name: float(m.get(head, {}).get(key, math.nan)) for name, (head, key, _) in BAR.items()}


def grouped_metrics(meta: Sequence[dict[str, Any]], grade: np.ndarray, findings: np.ndarray,
                    probs: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict[str, Any]:
    """:func:`disc_metrics` for all discs, per contrast and per vendor."""
    out = {"all": disc_metrics(grade, findings, probs, thresholds)}
    for key, field in (("contrast", "kind"), ("vendor", "vendor")):
        out[key] = {}
        for value in sorted({m[field] for m in meta}):
            idx = np.array([m[field] == value for m in meta])
            name = CONTRASTS.get(value, value) if key == "contrast" else value
            out[key][name] = disc_metrics(grade[idx], findings[idx], {h: p[idx] for h, p in probs.items()}, thresholds)
    return out


# --------------------------------------------------------------------------- plots


def plot_binary_rocs(findings: np.ndarray, probs: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """ROC curve of every finding in one figure."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from training.plots import plot_roc_curves

    curves = {}
    for j, h in enumerate(BINARY_HEADS):
        t = findings[:, j]
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = roc_curve(t, probs[h])
            curves[f"{h} (AUC {roc_auc_score(t, probs[h]):.3f}, n+ {int(t.sum())})"] = (fpr, tpr)
    return plot_roc_curves(curves, path, title or "ROC per finding")


def plot_reports(out_dir: Path, grade: np.ndarray, findings: np.ndarray, probs: dict[str, np.ndarray],
                 prefix: str, title: str) -> list[Path]:
    """Pfirrmann confusion matrix and the findings' ROC curves."""
    from sklearn.metrics import confusion_matrix

    from training.plots import plot_confusion

    cm = confusion_matrix(grade, probs["pfirrmann"].argmax(1), labels=list(range(len(PFIRRMANN_GRADES))))
    names = [f"grade {g}" for g in PFIRRMANN_GRADES]
    return [plot_confusion(cm, names, out_dir / f"{prefix}pfirrmann_confusion.png", f"Pfirrmann, {title}"),
            plot_binary_rocs(findings, probs, out_dir / f"{prefix}roc.png", f"findings, {title}")]


__all__ = [
    "ARCHITECTURE", "BAR", "CROP_PX", "DiscRecord", "GRADING_COLUMNS", "IVD_LEVELS", "Series", "bar_figures",
    "build_crops", "calibrate", "cross_validate", "disc_metrics", "fit_heads", "grouped_metrics", "load_gradings",
    "load_series", "locate", "plot_reports", "read_image", "targets_of",
]


# --------------------------------------------------------------------------- package


def location_summary(records: Sequence[DiscRecord]) -> dict[str, Any]:
    """How many graded lumbar discs were located, overall, per contrast and level, and why not."""
    def rate(rs: Sequence[DiscRecord]) -> dict[str, Any]:
        n = len(rs)
        k = sum(r.located for r in rs)
        return {"located": k, "discs": n, "rate": k / n if n else math.nan}

    reasons: dict[str, int] = {}
    for r in records:
        if not r.located:
            key = r.reason.split(":")[0].split(";")[0]
            reasons[key] = reasons.get(key, 0) + 1
    series = {r.series for r in records}
    full = {s for s in series if all(r.located for r in records if r.series == s)}
    return {
        "all": rate(records), "series": len(series), "series_all_five": len(full),
        "patients_with_a_located_disc": len({r.patient for r in records if r.located}),
        "contrast": {CONTRASTS.get(c, c): rate([r for r in records if r.kind == c]) for c in sorted({r.kind for r in records})},
        "level": {lv: rate([r for r in records if r.level == lv]) for lv in LUMBAR_DISCS},
        "reasons_not_located": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    }


def check_against_masks(space_dir: str | Path, locations_csv: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """Located disc points of the T2 SPACE images against the disc masks of ``spider-space``.

    A patient's mask is used when one of its kept slices is the data set's image (same grid,
    mean absolute difference under 15 grey levels). Mask discs are counted from the lowest
    (1 = L5-S1); pieces of one disc whose centres lie within 14 mm vertically are joined.
    """
    from scipy import ndimage

    space, data = Path(space_dir), Path(data_dir)
    cases = json.loads((space / "cases.json").read_text())
    with open(locations_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["located"] == "true" and r["kind"] == "t2_SPACE"]
    compared, right, dist, skipped = 0, 0, [], []
    for pid, case in cases.items():
        img = read_image(data / "images" / f"{pid}_t2_SPACE.png")
        best = None
        for path in sorted((space / pid).glob("slice???.png")):
            other = read_image(path)
            if other.shape == img.shape:
                d = float(np.abs(other - img).mean())
                best = (d, path) if best is None or d < best[0] else best
        if best is None or best[0] > 15:
            skipped.append(pid)
            continue
        mask = np.asarray(Image.open(str(best[1]).replace(".png", "_mask.png"))) == 2
        lab, n = ndimage.label(mask)
        mm = _spacing(case["PixelSpacing"])[0]
        parts = sorted(((c, ndimage.center_of_mass(lab == c)) for c in range(1, n + 1) if (lab == c).sum() > 50),
                       key=lambda t: -t[1][0])
        discs: list[tuple[list[int], tuple[float, float]]] = []
        for c, centre in parts:
            if discs and abs(discs[-1][1][0] - centre[0]) * mm < 14.0:
                ids = discs[-1][0] + [c]
                discs[-1] = (ids, ndimage.center_of_mass(np.isin(lab, ids)))
            else:
                discs.append(([c], centre))
        for r in rows:
            if r["patient"] != pid:
                continue
            p = np.array([float(r["row"]), float(r["column"])])
            d = [float(np.hypot(*(p - np.array(c)))) * mm for _, c in discs]
            compared += 1
            ivd = int(r["ivd_label"])
            if d and int(np.argmin(d)) == ivd - 1:
                right += 1
                dist.append(d[ivd - 1])
    return {"patients_compared": len(cases) - len(skipped), "patients_skipped": len(skipped), "discs": compared,
            "nearest_mask_disc_is_the_level": right,
            "distance_mm_median": float(np.median(dist)) if dist else math.nan,
            "distance_mm_p95": float(np.percentile(dist, 95)) if dist else math.nan}


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    np.savez_compressed(path, **arrays)


def _provenance(cases: int, figures: dict[str, float]) -> dict[str, Any]:
    return {
        "training_data": [{"name": "SPIDER lumbar MRI, training patients (mid-sagittal images)", "kind": "real",
                           "cases": int(cases)}],
        "validation": {"method": "internal cross-validation", "description": "patient-grouped 5-fold",
                       "figures": figures},
        "domain": {"modality": "MR", "series_roles": ["SAG_T2", "SAG_T1"], "contrasts": ["T1", "T2", "T2 SPACE"],
                   "body_part": "lumbar spine"},
    }


def fit_domain(model: Classifier, crops: CropSet, seed: int = 0) -> tuple[Any, dict[str, float]]:
    """Input-domain reference from the final network's features of its training crops.

    The threshold is the 99th percentile of the distances of the same crops under the
    training augmentation (new positions, zoom and contrast of the same anatomy);
    returns the reference and the shares it flags (training crops, augmented crops,
    uniform-noise crops).
    """
    from models.domain import FeatureDomain, penultimate_features

    pre = preprocessor()
    data = CropDataset(crops, pre)
    gen = torch.Generator().manual_seed(seed)
    model.eval()

    def feats(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([penultimate_features(model, x[i:i + 256])[0].numpy() for i in range(0, len(x), 256)])

    plain = feats(pre.standardize(data.unit))
    augmented = feats(pre.standardize(AUGMENT(data.unit, gen)))
    noise = torch.rand((200, 1, CROP_PX, CROP_PX), generator=gen)
    domain = FeatureDomain.fit(plain, augmented)
    flagged = {"training_crops": float(domain.outside(plain).mean()),
               "augmented_training_crops": float(domain.outside(augmented).mean()),
               "uniform_noise_crops": float(domain.outside(feats(pre.standardize(noise))).mean())}
    return domain, flagged


def train_discs(data_dir: str | Path, package_dir: str | Path, report_dir: str | Path, localizer: str | Path,
                folds: int = 5, epochs: int = 40, patience: int = 8, seed: int = 0, threads: int = 1,
                version: str = "1.0.0", progress: bool = False, log: Callable[[str], None] = print) -> ModelConfig:
    """Locate, crop, cross-validate, calibrate, train the shipped network and write its package.

    Writes the cross-validation report (``locations.csv``, ``cv.json``, plots) into
    ``report_dir`` and the package (weights, ``config.json``, domain reference,
    ``MODEL_CARD.md``, ``metrics.json``, plots) into ``package_dir``.
    """
    from models.package import save_package, sha256_file

    t_start = time.time()
    report, package = Path(report_dir), Path(package_dir)
    report.mkdir(parents=True, exist_ok=True)
    package.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    loc = LevelLocalizer.from_package(localizer)
    crops, records = build_crops(data_dir, loc, progress=progress)
    where = location_summary(records)
    write_locations(records, report / "locations.csv")
    log(f"located {where['all']['located']} of {where['all']['discs']} graded lumbar discs "
        f"({where['all']['rate']:.1%}); {len(crops)} crops of {where['patients_with_a_located_disc']} patients")
    settings = TrainSettings(epochs=epochs, batch_size=32, lr=1e-3, patience=patience, plateau_patience=3,
                             seed=seed, device="cpu", threads=threads, progress=progress)
    cv = cross_validate(crops, settings, folds, log)
    grade, findings = crops.labels, targets_of(crops)
    calibration = calibrate(cv["oof_logits"], grade, findings)
    temps = {h: float(calibration[h]["temperature"]) for h in HEADS}
    thresholds = {h: float(findings[:, j].mean()) for j, h in enumerate(BINARY_HEADS)}
    probs = head_probabilities(cv["oof_logits"], temps)
    metrics = grouped_metrics(crops.meta, grade, findings, probs, thresholds)
    save_arrays(report / "cv.npz", oof_logits=cv["oof_logits"], fold=cv["fold"], grade=grade, findings=findings)
    plots = plot_reports(package, grade, findings, probs, "cv_", "cross-validation")
    from training.plots import plot_history

    plots.append(plot_history([r["history"] for r in cv["runs"]], package / "training_curves.png",
                              "training curves (val accuracy: Pfirrmann)"))
    final_epochs = max(5, int(np.median([r["best_epoch"] for r in cv["runs"]])))
    log(f"final network: {final_epochs} epochs on all {len(crops)} crops")
    model = build_model(seed)
    fit_heads(model, CropDataset(crops, preprocessor()), findings, None, None,
              TrainSettings(**{**settings.to_dict(), "epochs": final_epochs}), desc="final")
    domain, flagged = fit_domain(model, crops, seed)
    dom_path = domain.save(package)
    dom_path.chmod(0o644)  # packages are read by the worker's service user
    figures = {k: round(v, 4) for k, v in bar_figures(metrics["all"]).items()}
    figures["discs located"] = round(where["all"]["rate"], 4)
    cases = len(np.unique(crops.groups))
    cfg = ModelConfig(
        name="discus-mr-disc-grading", architecture=ARCHITECTURE, task=TASK, version=version,
        input_size=(CROP_PX, CROP_PX), in_chans=1, class_names=list(OUTPUT_NAMES), preprocessing=dict(PREPROCESSING),
        model_kwargs=dict(MODEL_KWARGS),
        training={
            "task_description": "Pfirrmann grade and seven findings per lumbar disc on a sagittal MR crop",
            "data": {"source": crops.source, "crops": len(crops), "patients": cases,
                     "contrasts": {CONTRASTS.get(k, k): sum(m["kind"] == k for m in crops.meta)
                                   for k in sorted({m["kind"] for m in crops.meta})}},
            "crop": {"spec": CROP_SPECS[TASK].task, "size_mm": CROP_SPECS[TASK].size_mm, "px": CROP_PX,
                     "centre": "disc point of the level localizer, on the nearest image"},
            "strategy": "scratch", "folds": folds, "seed": seed, "epochs": epochs, "final_epochs": final_epochs,
            "best_epochs": [r["best_epoch"] for r in cv["runs"]], "optimizer": "Adam lr 0.001",
            "scheduler": "ReduceLROnPlateau (factor 0.5, patience 3)", "early_stopping_patience": patience,
            "loss": "class-weighted cross-entropy (Pfirrmann) + binary cross-entropy (findings)",
            "augmentation": AUGMENT.to_dict(), "train_seconds": round(time.time() - t_start, 1), "device": "cpu",
            "locations": where,
        },
        metrics={"cross_validation": metrics},
        explain={"multilayer": False},
        postprocessing={"thresholds": thresholds,
                        "threshold_rule": "prevalence of the finding in the training discs (a balanced operating point)",
                        "category": "herniation if herniation, else bulging if bulging, else normal"},
        provenance=_provenance(cases, figures),
        calibration={"method": "temperature scaling per head fitted on out-of-fold logits", "temperatures": temps,
                     "heads": calibration},
        domain_check={"file": dom_path.name, "sha256": sha256_file(dom_path), "threshold": domain.threshold,
                      "percentile": domain.percentile, "features": "penultimate layer (input of the heads)",
                      "flagged": flagged},
    )
    cfg = save_package(model, cfg, package)
    (package / "metrics.json").write_text(json.dumps({"cross_validation": metrics, "locations": where,
                                                      "calibration": calibration}, indent=2, default=_json) + "\n")
    (report / "cv.json").write_text(json.dumps({"metrics": metrics, "runs": [{k: v for k, v in r.items()}
                                                                           for r in cv["runs"]]}, indent=2,
                                               default=_json) + "\n")
    space = Path(data_dir).parent / "spider-space"
    masks = check_against_masks(space, report / "locations.csv", data_dir) if (space / "cases.json").is_file() else None
    write_card(package, cfg, metrics, where, calibration, flagged, plots, masks)
    log(f"package written to {package} ({time.time() - t_start:.0f} s)")
    return cfg


def _json(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_locations(records: Sequence[DiscRecord], path: Path) -> Path:
    """One row per graded lumbar disc: located or not, where, and why not."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["series", "patient", "kind", "vendor", "ivd_label", "level", "located", "row", "column",
                    "reason"])
        for r in records:
            row, col = r.point_px if r.point_px else ("", "")
            w.writerow([r.series, r.patient, r.kind, r.vendor, r.ivd_label, r.level, str(r.located).lower(),
                        f"{row:.1f}" if row != "" else "", f"{col:.1f}" if col != "" else "", r.reason])
    return path


def _f(v: Any, pct: bool = False) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def write_card(package: Path, cfg: ModelConfig, metrics: dict[str, Any], where: dict[str, Any],
               calibration: dict[str, Any], flagged: dict[str, float], plots: Sequence[Path],
               masks: dict[str, Any] | None = None) -> Path:
    """``MODEL_CARD.md``: provenance first, then data, location, figures per contrast and vendor, limits."""
    from models.provenance import Provenance

    prov = Provenance.from_dict(cfg.provenance)
    t = cfg.training
    groups = [("all", metrics["all"])] + [(k, v) for k, v in metrics["contrast"].items()] + [
        (k, v) for k, v in metrics["vendor"].items()]
    lines = [
        f"# {cfg.name} {cfg.version}", "", prov.one_line(), "",
        "**Research use only; not a medical device.** Measured by internal cross-validation on one public data "
        "set (four Dutch hospitals); no external test has been made.", "",
        f"- Task: `{cfg.task}`: per lumbar disc, the Pfirrmann grade (1-5) and seven findings: "
        f"{', '.join(BINARY_HEADS)} (Modic: any type vs none). The disc category (normal, bulging, herniation) "
        "follows from the herniation and bulging findings.",
        f"- Architecture: `{cfg.architecture}` {json.dumps(cfg.model_kwargs)} from scratch (no downloaded weights), "
        f"one shared feature vector, outputs {', '.join(cfg.class_names)}.",
        f"- Input: an upright sagittal crop of {t['crop']['size_mm']:.0f} mm at {CROP_PX} px centred on the disc point "
        "of the level localizer (`CROP_SPECS[\"mr_disc_grading\"]`, the same crop function in training and "
        f"inference); preprocessing {json.dumps(cfg.preprocessing)}.",
        f"- Weights SHA-256: `{cfg.sha256}`", "",
        "## Data", "",
        f"SPIDER (van der Graaf et al., Sci Data 11:264, 2024; CC BY 4.0), training patients only (SPIDER's validation "
        f"patients are held out and were not used): one mid-sagittal image per series, per-disc gradings by "
        f"radiologists. Used: {t['data']['crops']} disc crops of {t['data']['patients']} patients "
        f"({', '.join(f'{k} {v}' for k, v in t['data']['contrasts'].items())}); a patient's T1 and T2 images share "
        "his gradings and always fall in the same fold.", "",
        "## Disc location (the product's level localizer on the images)", "",
        f"Located {where['all']['located']} of {where['all']['discs']} graded lumbar discs "
        f"({_f(where['all']['rate'], True)}; bar 98%): all five in {where['series_all_five']} of {where['series']} "
        f"images. Per contrast: " + ", ".join(f"{k} {_f(v['rate'], True)} ({v['located']}/{v['discs']})"
                                             for k, v in where["contrast"].items()) + ". Per level: "
        + ", ".join(f"{k} {_f(v['rate'], True)}" for k, v in where["level"].items()) + ".",
        "", *([f"Checked against SPIDER's disc masks (`spider-space`, T2 SPACE, {masks['patients_compared']} patients "
               f"whose mask slice is the image): of {masks['discs']} located discs, the nearest mask disc is the named "
               f"level for {masks['nearest_mask_disc_is_the_level']}, {masks['distance_mm_median']:.1f} mm from its "
               f"centre (median; p95 {masks['distance_mm_p95']:.1f} mm). The others were looked at: the mask splits the "
               "oblique L5-S1 disc into two pieces more than 14 mm apart, which shifts the count; the points are at the "
               "right discs. A sample of T1 and T2 overlays was also checked by eye.", ""] if masks else []),
        "Why discs were not located (discs):", "",
        *[f"- {n}: {k}" for k, n in where["reasons_not_located"].items()], "",
        "Each image is given to the localizer as a stack of three copies (it needs at least two images), "
        "read anterior-left as the images are stored. "
        "Only located discs were used for training and are scored below: the figures describe discs the "
        "localizer finds, not all discs.", "",
        "## Cross-validation (patient-grouped 5-fold, out-of-fold predictions, calibrated)", "",
        "| figure | bar | " + " | ".join(g for g, _ in groups) + " |",
        "|---|---|" + "---|" * len(groups),
    ]
    for name, (head, key, bar) in BAR.items():
        lines.append(f"| {name} | {bar:.2f} | " + " | ".join(_f(m.get(head, {}).get(key)) for _, m in groups) + " |")
    lines.append("| Pfirrmann exact | 0.79 (SpineNet) | " + " | ".join(_f(m.get("pfirrmann", {}).get("exact")) for _, m in groups) + " |")
    lines.append("| Pfirrmann kappa | 0.68 (SpineNet) | " + " | ".join(_f(m.get("pfirrmann", {}).get("kappa")) for _, m in groups) + " |")
    lines.append("| discs | | " + " | ".join(str(m["n_discs"]) for _, m in groups) + " |")
    lines += ["", "Every finding (all discs): AUC, and sensitivity / specificity at the shipped threshold "
              "(the finding's prevalence in the training discs):", "",
              "| finding | positives | AUC | sensitivity | specificity | balanced accuracy |", "|---|---|---|---|---|---|"]
    for h in BINARY_HEADS:
        m = metrics["all"][h]
        lines.append(f"| {h} | {m['positives']} | {_f(m['auc'])} | {_f(m['sensitivity'])} | {_f(m['specificity'])} | "
                     f"{_f(m['balanced_accuracy'])} |")
    met = [n for n, (h, k, bar) in BAR.items() if metrics["all"].get(h, {}).get(k, math.nan) >= bar]
    lines += ["", f"Bar met (all discs): {', '.join(met) if met else 'none'}; not met: "
              f"{', '.join(n for n in BAR if n not in met) or 'none'}; discs located: "
              f"{'met' if where['all']['rate'] >= 0.98 else 'not met'}.", "",
              "## Calibration", "",
              "Temperature scaling per head, fitted on the out-of-fold logits (expected calibration error, 15 bins):", "",
              "| head | temperature | ECE before | ECE after |", "|---|---|---|---|"]
    for h in HEADS:
        c = calibration[h]
        lines.append(f"| {h} | {c['temperature']:.3f} | {c['ece_before']:.3f} | {c['ece_after']:.3f} |")
    lines += ["", "The ECE after is measured on the same logits the temperature was fitted on (optimistic).", "",
              "## Input-domain check", "",
              f"Mahalanobis distance of the penultimate features to those of the training crops (`{cfg.domain_check['file']}`), "
              f"threshold {cfg.domain_check['threshold']:.2f} = the {cfg.domain_check['percentile']:.0f}th percentile of "
              "the distances of the augmented training crops. Flagged: "
              + ", ".join(f"{k.replace('_', ' ')} {_f(v, True)}" for k, v in flagged.items()) + ". A flagged crop "
              "gets no finding, only a warning.", "",
              "## Training", "",
              f"Adam (lr 0.001), ReduceLROnPlateau (factor 0.5, patience 3), early stopping (patience {t['early_stopping_patience']}) "
              f"on the validation loss, up to {t['epochs']} epochs (best epochs per fold {t['best_epochs']}); the shipped "
              f"network trained on all crops for {t['final_epochs']} epochs (median best epoch), seed {t['seed']}. "
              f"Augmentation {json.dumps(t['augmentation'])}: no flips (they would swap the endplates or the disc "
              f"margins). {t['train_seconds']:.0f} s on 1 CPU thread in all.", "",
              "## Limits", "",
              "- Mid-sagittal 2D images only: one image per disc, no parasagittal or axial information (foraminal or "
              "lateral herniations are not visible on it).",
              "- Four Dutch hospitals, Siemens and Philips, 1.5 T and 3 T, patients with low back pain; other "
              "scanners, protocols and populations are untested.",
              "- The images were min-max scaled to 8 bits; DICOM input is scaled by the same percentile "
              "preprocessing but was not part of the validation.",
              "- Rare findings (spondylolisthesis, herniation) have few positive discs; their figures are uncertain.",
              "- Only discs the level localizer names are graded; its failures (above) are this model's failures.",
              "- Heatmaps (Grad-CAM) show where the network looked, not a lesion outline.", "",
              "## Plots", "", *[f"![{Path(p).stem}]({Path(p).name})" for p in plots]]
    path = package / "MODEL_CARD.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


#: Columns of ``predictions.csv`` written by :func:`evaluate_discs`.
PREDICTION_COLUMNS: tuple[str, ...] = (
    "series", "patient", "ivd_label", "level", "located", "pfirrmann",
    *(f"p_pfirrmann_{g}" for g in PFIRRMANN_GRADES), *(f"p_{h}" for h in BINARY_HEADS),
)


def evaluate_discs(data_dir: str | Path, out_dir: str | Path, package: str | Path, localizer: str | Path,
                   progress: bool = True) -> dict[str, Any]:
    """Localize and grade every image of a SPIDER-format folder; write predictions, metrics and plots.

    ``predictions.csv`` has one row per (series, IVD label) of ``gradings.csv``. The
    product grades lumbar discs (IVD labels 1-5): a row of another label says whether
    the localizer named that disc but carries no prediction, and so does a lumbar disc
    that was not located (``located`` false). Returns the metrics written to ``metrics.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loc = LevelLocalizer.from_package(localizer)
    grader = DiscGrader.from_package(package)
    series = load_series(data_dir)
    grads = load_gradings(data_dir)
    rows: list[dict[str, Any]] = []
    records: list[DiscRecord] = []
    scored: list[tuple[dict[str, Any], dict[str, int], Any]] = []
    seconds = []
    for s in tqdm(series, desc="grade", disable=not progress, leave=False):
        labels = sorted(ivd for (p, ivd) in grads if p == s.patient)
        if not labels:
            continue
        t0 = time.perf_counter()
        image = read_image(s.path)
        pts, array, affine, reason = locate(loc, image, s.pixel_spacing)
        graded = {g.level: g for g in grader.grade(array, affine, pts)}
        seconds.append(time.perf_counter() - t0)
        for ivd in labels:
            level = IVD_LEVELS.get(ivd, f"IVD {ivd}")
            g = graded.get(level)
            row: dict[str, Any] = {c: "" for c in PREDICTION_COLUMNS}
            row.update(series=s.series, patient=s.patient, ivd_label=ivd, level=level,
                       located=str(g is not None or level in pts).lower())
            if g is not None:
                row["pfirrmann"] = g.pfirrmann
                row.update({f"p_pfirrmann_{k}": f"{v:.4f}" for k, v in zip(PFIRRMANN_GRADES, g.p_pfirrmann)})
                row.update({f"p_{h}": f"{g.probabilities[h]:.4f}" for h in BINARY_HEADS})
                scored.append(({"kind": s.kind, "vendor": s.vendor}, grads[(s.patient, ivd)], g))
            rows.append(row)
            if ivd in range(1, 6):
                records.append(DiscRecord(s.series, s.patient, s.kind, s.vendor, ivd, level, g is not None,
                                          "" if g is not None else (reason or f"{level} not named"), None,
                                          grads[(s.patient, ivd)]))
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(PREDICTION_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    result: dict[str, Any] = {"package": str(package), "version": grader.config.version,
                              "locations": location_summary(records) if records else {},
                              "seconds_per_image_median": float(np.median(seconds)) if seconds else math.nan}
    if scored:
        meta = [m for m, _, _ in scored]
        grade = np.array([lab["pfirrmann"] - 1 for _, lab, _ in scored])
        findings = np.array([[lab[h] for h in BINARY_HEADS] for _, lab, _ in scored], np.float32)
        probs = {"pfirrmann": np.array([g.p_pfirrmann for _, _, g in scored])}
        probs.update({h: np.array([g.probabilities[h] for _, _, g in scored]) for h in BINARY_HEADS})
        result["metrics"] = grouped_metrics(meta, grade, findings, probs, grader.thresholds)
        result["bar"] = bar_figures(result["metrics"]["all"])
        result["out_of_domain"] = int(sum(not g.in_domain for _, _, g in scored))
        result["plots"] = [p.name for p in plot_reports(out, grade, findings, probs, "", "evaluation")]
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=_json) + "\n")
    return result
