"""Scoring the spine segmenter and its measurements against reference masks.

``discus evaluate segmentation DIR --out OUT`` runs the product's path on every case of
a folder in the ``lumbar-mri-levels`` format (``levels.json``, NIfTI image and labels) or
the ``spider-space`` format (``cases.json``, PNG slices and masks): segment every sagittal
image, name bodies and discs by level points, write the predicted mask, and measure the
predicted and the reference masks with the same code (:func:`models.measurements.measure_sagittal`)
on the same image, the reference's mid-sagittal one (largest vertebral body area).

Outputs: ``metrics.json`` (Dice per structure, per measurement n, mean absolute error, bias,
ICC(A,1)), ``measurements.csv`` (``case, level, measurement, unit, predicted, reference``),
``cases/<case>_pred_labels.nii.gz`` and ``bland_altman.png``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.measurements import CANAL_LABEL, VERTEBRA_LABELS
from models.segmentation import TASK, SpineSegmenter, measure_image, source_labels

#: Level points used to name predicted bodies and discs.
LEVEL_SOURCES = ("localizer", "reference")
_BODY_LABELS = frozenset(VERTEBRA_LABELS.values())
#: Images segmented on either side of the midline (mm).
HALF_WIDTH_MM = 30.0


@dataclass
class EvalCase:
    """One case as a sagittal stack: ``array[slice, row, column]`` (rows superior->inferior,
    columns anterior->posterior), its affine to patient LPS mm, the reference labels on the same
    array, the reference level points as ``(column, row, slice)`` voxels and how to write a NIfTI back."""

    name: str
    array: np.ndarray
    affine: np.ndarray
    reference: np.ndarray
    points: dict[str, tuple[float, float, float]]
    to_nifti: Callable[[np.ndarray], Any]


def default_package() -> Path:
    """The shipped segmentation package."""
    return Path(__file__).resolve().parents[1] / "models" / "packages" / TASK


def iter_cases(data_dir: str | Path) -> Iterator[EvalCase]:
    """Cases of a ``levels.json`` or ``cases.json`` folder as :class:`EvalCase`.

    Raises
    ------
    FileNotFoundError
        If the folder has neither file.
    """
    root = Path(data_dir)
    if (root / "levels.json").is_file():
        yield from _levels_cases(root)
    elif (root / "cases.json").is_file():
        yield from _spider_cases(root)
    else:
        raise FileNotFoundError(f"data_dir: neither levels.json nor cases.json in {root}")


def _levels_cases(root: Path) -> Iterator[EvalCase]:
    import nibabel as nib

    from training.levels import to_dicom_geometry

    meta = json.loads((root / "levels.json").read_text())
    for name, c in sorted(meta["cases"].items()):
        img = nib.load(str(root / c["image"]))
        ref_path = root / c["labels"] if c.get("labels") else None
        image = np.asarray(img.dataobj)
        affine_ras = np.asarray(c.get("affine", img.affine), float)
        ref = (np.asarray(nib.load(str(ref_path)).dataobj).astype(np.int16) if ref_path and ref_path.is_file()
               else np.zeros(image.shape, np.int16))
        array, aff = to_dicom_geometry(image, affine_ras)
        pts = {k: v["centroid"]["vox"] for k, v in (c.get("vertebrae") or {}).items()}
        pts.update({k: v["vox"] for k, v in (c.get("discs") or {}).items()})
        points = {k: (float(v[1]), float(v[0]), float(v[2])) for k, v in pts.items()}

        def to_nifti(pred: np.ndarray, _img: Any = img, _aff: np.ndarray = affine_ras) -> Any:
            out = nib.Nifti1Image(np.transpose(pred, (1, 2, 0)).astype(np.int16), _aff)
            out.header.set_qform(_aff, code=2)
            out.header.set_sform(_aff, code=2)
            return out

        yield EvalCase(name, array, aff, np.ascontiguousarray(np.transpose(ref, (2, 0, 1))), points, to_nifti)


def _spider_cases(root: Path) -> Iterator[EvalCase]:
    import nibabel as nib

    from training.segmentation import load_spider_space

    for case in load_spider_space(root):
        array, aff = case.stack()
        ref = np.stack([s.levels for s in case.slices])
        mid = case.slices[case.mid]
        points = {k: (c, r, float(case.mid)) for k, (r, c) in mid.points.items()}
        sy, sx = mid.spacing

        def to_nifti(pred: np.ndarray, _sy: float = sy, _sx: float = sx, _st: float = case.slice_mm) -> Any:
            return nib.Nifti1Image(np.transpose(pred, (1, 2, 0)).astype(np.int16), np.diag([_sy, _sx, _st, 1.0]))

        yield EvalCase(case.name, array, aff, ref, points, to_nifti)


def localizer_points(case: EvalCase, localizer: Any) -> tuple[dict[str, tuple[float, float, float]], str | None]:
    """The product's level points on the case: ``(column, row, slice)`` per level, and a refusal reason."""
    result = localizer(case.array, case.affine)
    return {p.name: tuple(float(v) for v in p.voxel) for p in result.points}, result.reason


def predict_labels(segmenter: SpineSegmenter, case: EvalCase,
                   points: Mapping[str, tuple[float, float, float]]) -> np.ndarray:
    """Predicted label mask of the case on its own grid ``[slice, row, column]``.

    The images within :data:`HALF_WIDTH_MM` of the level points' median slice are segmented
    (vertebral bodies are about 50 mm wide); the others, and every image of a case without
    level points, stay background.
    """
    n, h, w = case.array.shape
    out = np.zeros((n, h, w), np.int16)
    if not points:
        return out
    step = float(np.linalg.norm(case.affine[:3, 2]))
    mid = float(np.median([p[2] for p in points.values()]))
    todo = [s for s in range(n) if abs(s - mid) * step <= HALF_WIDTH_MM]
    seg = segmenter.segment(case.array, case.affine, todo)
    for i, s in enumerate(todo):
        out[s] = source_labels(seg, i, (h, w), case.affine, points)
    return out


def dice_by_structure(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice of bodies and discs over the levels the reference labels (names must match), and of the canal."""
    out: dict[str, float] = {}
    ref_labels = {int(v) for v in np.unique(ref)} - {0}
    groups = {"vertebral body": [v for v in ref_labels if v in _BODY_LABELS],
              "disc": [v for v in ref_labels if 100 < v < CANAL_LABEL],
              "spinal canal": [CANAL_LABEL] if CANAL_LABEL in ref_labels else []}
    for name, labels in groups.items():
        if not labels:
            continue
        inter = tot = 0
        for v in labels:
            p, r = pred == v, ref == v
            inter += int((p & r).sum())
            tot += int(p.sum() + r.sum())
        out[name] = 2.0 * inter / tot if tot else float("nan")
    return out


def icc_a1(pred: np.ndarray, ref: np.ndarray) -> float:
    """ICC(A,1): two-way, absolute agreement, single measurement (McGraw & Wong 1996; Shrout & Fleiss ICC(2,1))."""
    x = np.stack([np.asarray(pred, float), np.asarray(ref, float)], axis=1)
    n, k = x.shape
    if n < 3:
        return float("nan")
    grand = x.mean()
    ms_r = k * ((x.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    ms_c = n * ((x.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    ss_e = ((x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + grand) ** 2).sum()
    ms_e = ss_e / ((n - 1) * (k - 1))
    denom = ms_r + (k - 1) * ms_e + k * (ms_c - ms_e) / n
    return float((ms_r - ms_e) / denom) if denom > 0 else float("nan")


def agreement(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per measurement name: n, mean absolute error, bias (predicted - reference), ICC(A,1), unit."""
    out: dict[str, dict[str, float]] = {}
    names = sorted({r["measurement"] for r in rows if r["unit"]})
    for name in names:
        pairs = [(r["predicted"], r["reference"]) for r in rows
                 if r["measurement"] == name and r["predicted"] != "" and r["reference"] != ""]
        if not pairs:
            continue
        p, q = (np.asarray(v, float) for v in zip(*pairs))
        d = p - q
        out[name] = {"n": len(d), "unit": next(r["unit"] for r in rows if r["measurement"] == name),
                     "mae": round(float(np.abs(d).mean()), 3), "bias": round(float(d.mean()), 3),
                     "sd_diff": round(float(d.std(ddof=1)), 3) if len(d) > 1 else float("nan"),
                     "icc_a1": round(icc_a1(p, q), 3)}
    return out


def measurement_rows(case: str, pred: np.ndarray, ref: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """``case, level, measurement, unit, predicted, reference`` for one image measured on both masks.

    ``affine`` is the image's stack affine (its pixel size and orientation; :func:`models.segmentation.measure_image`).
    """
    mp, mr = measure_image(pred, affine), measure_image(ref, affine)
    keyed: dict[tuple[str, str], dict[str, Any]] = {}
    for which, m in (("predicted", mp), ("reference", mr)):
        for r in m.to_rows():
            row = keyed.setdefault((r["level"], r["measurement"]), {
                "case": case, "level": r["level"], "measurement": r["measurement"], "unit": r["unit"],
                "predicted": "", "reference": ""})
            row[which] = r["value"]
    return list(keyed.values())


def evaluate_segmentation(data_dir: str | Path, out_dir: str | Path, package: str | Path | None = None,
                          levels: str = "localizer", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Segment, label and measure every case of ``data_dir``; write the report to ``out_dir``.

    Parameters
    ----------
    levels
        ``"localizer"``: bodies and discs are named by the product's level localizer, as in
        the worker (a refused case gets no named structure); ``"reference"``: by the
        reference level points, which scores the segmentation alone.

    Raises
    ------
    ValueError
        If ``levels`` is not one of :data:`LEVEL_SOURCES`.
    """
    if levels not in LEVEL_SOURCES:
        raise ValueError(f"levels: one of {LEVEL_SOURCES}, got {levels!r}")
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    segmenter = SpineSegmenter.from_package(package or default_package())
    localizer = None
    if levels == "localizer":  # loaded once for every case
        from models.localizer import LevelLocalizer
        from models.package import find_package

        localizer = LevelLocalizer.from_package(find_package("levels"))
    per_case: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for case in iter_cases(data_dir):
        t0 = time.perf_counter()
        reason = None
        if levels == "localizer":
            points, reason = localizer_points(case, localizer)
        else:
            points = case.points
        pred = predict_labels(segmenter, case, points)
        seconds = time.perf_counter() - t0
        case.to_nifti(pred).to_filename(str(out / "cases" / f"{case.name}_pred_labels.nii.gz"))
        dice = dice_by_structure(pred, case.reference)
        body_area = np.isin(case.reference, list(_BODY_LABELS)).sum(axis=(1, 2))
        mid = int(np.argmax(body_area))
        rows += measurement_rows(case.name, pred[mid], case.reference[mid], case.affine)
        per_case[case.name] = {"dice": dice, "seconds": round(seconds, 2), "measured_slice": mid,
                               **({"levels_refused": reason} if reason else {})}
        if log:
            log(f"{case.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()) + f" ({seconds:.1f} s)")
    with open(out / "measurements.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "level", "measurement", "unit", "predicted", "reference"])
        w.writeheader()
        w.writerows(rows)
    metrics: dict[str, Any] = {"n_cases": len(per_case), "levels_from": levels}
    for s in ("vertebral body", "disc", "spinal canal"):
        vals = [c["dice"][s] for c in per_case.values() if s in c["dice"] and np.isfinite(c["dice"][s])]
        if vals:
            metrics[f"dice_{s.split()[-1]}"] = round(float(np.mean(vals)), 4)
    metrics["measurements"] = agreement(rows)
    metrics["cases"] = per_case
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_bland_altman(rows, out / "bland_altman.png")
    return metrics


def plot_bland_altman(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Bland-Altman plots (difference against mean, bias and 95 % limits) of the millimetre and degree measurements."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["measurement"] for r in rows if r["unit"] in ("mm", "deg")
                    and r["predicted"] != "" and r["reference"] != ""})
    if not names:
        return None
    cols = 4
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        pairs = [(float(r["predicted"]), float(r["reference"])) for r in rows if r["measurement"] == name
                 and r["predicted"] != "" and r["reference"] != ""]
        p, q = (np.asarray(v) for v in zip(*pairs))
        m, d = (p + q) / 2, p - q
        ax.scatter(m, d, s=8, alpha=0.6)
        bias, sd = d.mean(), d.std(ddof=1) if len(d) > 1 else 0.0
        for y, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
            ax.axhline(y, color="k", linestyle=style, linewidth=0.8)
        unit = next(r["unit"] for r in rows if r["measurement"] == name)
        ax.set_title(f"{name} (n={len(d)})", fontsize=9)
        ax.set_xlabel(f"mean of predicted and reference ({unit})", fontsize=8)
        ax.set_ylabel(f"predicted - reference ({unit})", fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


__all__ = ["EvalCase", "agreement", "dice_by_structure", "evaluate_segmentation", "icc_a1",
           "iter_cases", "measurement_rows", "plot_bland_altman", "predict_labels"]
