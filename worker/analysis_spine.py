"""Spine measurements on the sagittal series: segment, name by level, measure, draft the report.

After level localization, the spine segmenter labels vertebral bodies, discs and the spinal
canal on the midline image of the sagittal series and its two neighbours; bodies and discs are
named by the located level points; :func:`models.segmentation.measure_image` measures the midline
image (heights, slip, canal diameter, lordosis) with the same code that scored the package
against reference masks. The result gets the measurements with their derived grades, the masks
for a DICOM Segmentation, and a short draft report text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from dicom_io.results import LORDOSIS_LEVEL, MeasurementCategory, SegmentationMasks, SpineMeasurement, StudyResult
from dicom_io.volume import Volume
from models.measurements import LABEL_NAMES, VERTEBRA_LABELS, disc_label
from models.segmentation import REPORTED_LEVELS, measure_image, midline_slice, source_labels
from worker.analysis import Run, image_ref, no_levels_reason

#: Task of the segmentation package.
SEGMENTATION = "spine_segmentation"


def measure_spine(run: Run, volume: Volume, points: dict[str, tuple[np.ndarray, float]]) -> None:
    """Segment and measure the midline of ``volume``; fills measurements, categories, masks and the draft report.

    A failing segmenter costs the study only its measurements (``not_run`` says why).
    """
    segmenter = run.model(SEGMENTATION)
    if segmenter is None:
        return
    if not points:
        run.not_run(SEGMENTATION, no_levels_reason(run))
        return
    n, h, w = volume.array.shape
    try:
        mid = midline_slice(volume.array.shape, volume.affine, [p for p, _ in points.values()])
        slices = [s for s in (mid - 1, mid, mid + 1) if 0 <= s < n]
        with run.stage("segment"):
            seg = segmenter.segment(volume.array, volume.affine, slices)
        vox = {k: volume.patient_to_voxel(np.asarray(p, float))[0] for k, (p, _) in points.items()}
        with run.stage("measure"):
            masks = {s: source_labels(seg, i, (h, w), volume.affine, vox) for i, s in enumerate(slices)}
            measured = measure_image(masks[mid], volume.affine)
    except Exception as exc:  # the measurements are lost, not the study
        run.not_run(SEGMENTATION, f"the model failed: {type(exc).__name__}: {exc}")
        return
    info = run.used.get(SEGMENTATION)
    name, version = (info.name, info.version) if info else (SEGMENTATION, "unknown")
    gate = Validation(getattr(segmenter, "config", {}), run.options.report_below_target_models)
    outlines = {lv: _outline(masks[mid], lv) for lv in {m.level for m in measured.measurements}}
    for m in measured.measurements:
        if m.level not in REPORTED_LEVELS or not gate.measurement(m.name):
            continue
        where = m.points or outlines.get(m.level) or (((vox[m.level][1], vox[m.level][0]),) if m.level in vox else ())
        r, c = np.mean(np.asarray(where, float), axis=0) if where else ((h - 1) / 2, (w - 1) / 2)
        run.result.measurements.append(SpineMeasurement(
            level=m.level, name=m.name, value=m.value, unit=m.unit, image=image_ref(volume, mid, r, c),
            points=m.points, basis=m.basis, model=name, model_version=version,
            region=outlines.get(m.level) or m.points, uncertainty=gate.mae(m.name)))
    for cat in measured.categories:
        if cat.level not in REPORTED_LEVELS or not gate.category(cat.name):
            continue
        outline = outlines.get(cat.level) or ()
        r, c = np.mean(np.asarray(outline, float), axis=0) if outline else ((h - 1) / 2, (w - 1) / 2)
        run.result.categories.append(MeasurementCategory(
            level=cat.level, name=cat.name, value=cat.value, basis=cat.basis, image=image_ref(volume, mid, r, c),
            model=name, model_version=version))
    if volume.frames:
        run.warn("spine segmentation: the sagittal series is multi-frame; no DICOM Segmentation written")
    else:
        kept = {s: gate.seg_mask(m) for s, m in masks.items()}
        present = sorted({int(v) for m in kept.values() for v in np.unique(m)} - {0})
        if present:
            run.result.segmentation = SegmentationMasks(
                series_instance_uid=volume.series_instance_uid,
                masks={volume.sop_instance_uids[s]: m for s, m in kept.items() if m.any()},
                labels={v: LABEL_NAMES[v] for v in present if v in LABEL_NAMES}, model=name, model_version=version)
    for key, why in gate.withheld().items():
        run.not_run(key, why)
    run.result.draft_report = draft_report(run.result)


class Validation:
    """What the segmentation package may report: its ``postprocessing.validated`` table.

    A structure (in the SEG) or a measurement or grade (in the SR, key image and draft report)
    is reported when its cross-validated figure met its target, or when the site allows packages
    below target (``report_below_target_models``). A package without the table reports nothing.
    """

    def __init__(self, config: Any, allow_all: bool) -> None:
        post = (config or {}).get("postprocessing", {}) if isinstance(config, dict) else {}
        self.table: dict[str, Any] = post.get("validated") or {}
        self.allow_all = bool(allow_all)
        self._withheld: dict[str, set[str]] = {"measurements": set(), "structures": set()}

    def _ok(self, kind: str, name: str) -> bool:
        entry = self.table.get(kind, {}).get(name)
        ok = bool(entry and entry.get("meets_target"))
        if not ok and not self.allow_all and kind != "categories":
            self._withheld[kind].add(name)
        return ok or self.allow_all

    def measurement(self, name: str) -> bool:
        return self._ok("measurements", name)

    def category(self, name: str) -> bool:
        return self._ok("categories", name)

    def mae(self, name: str) -> float | None:
        v = self.table.get("measurements", {}).get(name, {}).get("mae")
        return float(v) if isinstance(v, (int, float)) else None

    def seg_mask(self, mask: np.ndarray) -> np.ndarray:
        """The mask with the structures that are not reported set to background."""
        keep = {"vertebral body": self._ok("structures", "vertebral body"),
                "disc": self._ok("structures", "disc"), "spinal canal": self._ok("structures", "spinal canal")}
        out = mask.copy()
        if not keep["vertebral body"]:
            out[(out > 0) & (out < 100)] = 0
        if not keep["disc"]:
            out[(out > 100) & (out < 200)] = 0
        if not keep["spinal canal"]:
            out[out == 200] = 0
        return out

    def withheld(self) -> dict[str, str]:
        """``not_run`` entries: what was withheld for missing its target, with the figures."""
        out = {}
        ms = sorted(self._withheld["measurements"])
        if ms:
            table = self.table.get("measurements", {})
            parts = [f"{n} (MAE {table[n]['mae']:.1f} {table[n]['unit']}, ICC {table[n]['icc_a1']:.2f})"
                     if "derived_from" not in table.get(n, {}) and "mae" in table.get(n, {})
                     and "icc_a1" in table[n] else n for n in ms]
            out["spine measurements"] = ("below their cross-validated targets (MAE <= 1 mm or 3 deg, ICC >= 0.90), "
                                         "withheld: " + ", ".join(parts))
        st = sorted(self._withheld["structures"])
        if st:
            table = self.table.get("structures", {})
            parts = [f"{n} (Dice {table[n]['dice']:.2f} < {table[n]['target']:.2f})"
                     if isinstance(table.get(n, {}).get("dice"), (int, float)) else n for n in st]
            out["spine segmentation"] = "structures below their cross-validated Dice targets, not in the SEG: " + (
                ", ".join(parts))
        return out


def _outline(mask: np.ndarray, level: str) -> tuple[tuple[float, float], ...]:
    """Closed convex outline ``(row, column)`` of a level's structure on the mask (empty if absent)."""
    if level == LORDOSIS_LEVEL:
        return ()
    value = VERTEBRA_LABELS.get(level) if "-" not in level else _disc_value(level)
    if value is None:
        return ()
    rr, cc = np.nonzero(mask == value)
    if len(rr) < 3:
        return ()
    pts = np.stack([rr, cc], axis=1).astype(float)
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return ()
    ring = pts[hull.vertices]
    ring = np.vstack([ring, ring[:1]])  # closed: first point repeated
    return tuple((float(r), float(c)) for r, c in ring)


def _disc_value(level: str) -> int | None:
    try:
        return disc_label(level)
    except ValueError:
        return None


def _fmt(v: float, unit: str) -> str:
    if unit == "deg":
        return f"{v:.0f} degrees"
    if unit == "%":
        return f"{v:.0f} %"
    return f"{v:.1f} mm"


def draft_report(result: StudyResult) -> str:
    """Plain sentences per level from the measurements and their grades, marked as an AI-generated draft.

    For the radiologist to accept or edit; only what was measured is written, abnormal first
    within each level.
    """
    by_level: dict[str, dict[str, Any]] = {}
    for m in result.measurements:
        by_level.setdefault(m.level, {})[m.name] = m
    cats: dict[tuple[str, str], str] = {(c.level, c.name): c.value for c in result.categories}
    if not by_level:
        return ""
    model = next((f"{m.model} {m.model_version}" for m in result.measurements), "")
    lines = [f"AI-GENERATED DRAFT ({model}) - measurements on the midline sagittal image; "
             "to be checked, edited or discarded by the radiologist. +- is the model's cross-validated "
             "mean absolute error."]

    def pm(*ms: Any) -> str:
        errs = [m.uncertainty for m in ms if m is not None and m.uncertainty is not None]
        return f" (+-{max(errs):.1f} {ms[0].unit})" if errs else ""

    order = ["T12", "T12-L1", "L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5", "L5-S1"]
    for lv in order:
        ms = by_level.get(lv)
        if not ms:
            continue
        parts = []
        if "-" not in lv:
            hs = [ms.get(k) for k in ("anterior body height", "middle body height", "posterior body height")]
            if all(hs):
                parts.append("vertebral body height anterior/middle/posterior "
                             + "/".join(f"{x.value:.1f}" for x in hs) + " mm" + pm(*hs))
            g = cats.get((lv, "Genant grade"))
            loss = ms.get("body height loss")
            if g and g != "0" and loss:
                parts.insert(0, f"height loss {loss.value:.0f} % (Genant grade {g})")
        else:
            dh = [ms.get(k) for k in ("disc height anterior", "disc height middle", "disc height posterior")]
            if all(dh):
                parts.append("disc height anterior/middle/posterior " + "/".join(f"{x.value:.1f}" for x in dh) + " mm"
                             + pm(*dh))
            canal = ms.get("canal AP diameter")
            if canal:
                st = cats.get((lv, "central canal stenosis"), "")
                text = f"canal AP diameter {canal.value:.1f} mm{pm(canal)}" + (
                    f" ({st} stenosis)" if st and st != "normal" else "")
                parts.insert(0 if st and st != "normal" else len(parts), text)
            slip, pct = ms.get("slip"), ms.get("slip percent")
            grade = cats.get((lv, "Meyerding grade"))
            if slip and pct and grade and grade != "0":
                kind = "anterolisthesis" if slip.value > 0 else "retrolisthesis"
                upper, lower = lv.split("-")
                parts.insert(0, f"{kind} of {upper} on {lower} {abs(slip.value):.1f} mm{pm(slip)} "
                                f"({abs(pct.value):.0f} %, Meyerding grade {grade})")
        if parts:
            lines.append(f"{lv}: " + "; ".join(parts) + ".")
    lordosis = by_level.get(LORDOSIS_LEVEL, {}).get("lordosis L1-S1")
    if lordosis:
        lines.append(f"Lumbar lordosis L1-S1: {_fmt(lordosis.value, 'deg')}{pm(lordosis)}.")
    return "\n".join(lines)
