"""What the modality analyses share: options, the run state, crops, batched classification, heatmaps.

A :class:`Run` carries one study's :class:`~dicom_io.results.StudyResult` while the
MR, CT and X-ray analyses fill it. Crops are made only with
:func:`models.crops.crop_at_disc` (the classifiers were trained on exactly these
crops), centred on the nearest source image so that every crop and every heatmap
belongs to one real image of the study.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from scipy import ndimage

from dicom_io.results import (
    DISCS,
    GRADES,
    ConditionValues,
    Finding,
    ImageRef,
    LevelLocation,
    ModelInfo,
    StudyResult,
)
from dicom_io.volume import Volume
from models.crops import CROP_SPECS, CropGeometry, CropSpec, crop_at_disc, crop_to_image, offset_point
from worker.geometry import SlicePick, pick_slice
from worker.model_packages import ModelPackages

log = logging.getLogger(__name__)

#: Discs graded by default (the RSNA lumbar levels).
DEFAULT_GRADED_LEVELS: tuple[str, ...] = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")


#: Why an analysis whose package never saw a patient is withheld.
SYNTHETIC_ONLY_REASON = "trained on synthetic data only; not validated on patient images"
#: Why an analysis whose validation on patients missed its targets is withheld.
BELOW_TARGET_REASON = "validated on patient images below its accuracy targets"


@dataclass(frozen=True)
class AnalysisOptions:
    """Knobs of the analysis.

    Parameters
    ----------
    heatmap_min_severity
        Grad-CAM is computed for findings whose grade index (0 = no finding) is
        at least this; 1 = every abnormal grade, 0 = every finding.
    slice_tolerance_mm
        Largest distance between a crop centre and the image it is taken from;
        farther images are rejected with a warning.
    low_confidence
        Level points below this localization confidence get a warning.
    max_batch
        Largest number of crops in one forward pass.
    graded_levels
        Disc levels that are graded.
    report_synthetic_models
        Let packages trained on synthetic data only report on the study; when
        False (the default) their analyses are listed in ``not_run`` instead.
    """

    heatmap_min_severity: int = 1
    slice_tolerance_mm: float = 4.0
    low_confidence: float = 0.5
    max_batch: int = 32
    graded_levels: tuple[str, ...] = DEFAULT_GRADED_LEVELS
    report_synthetic_models: bool = False
    report_below_target_models: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.heatmap_min_severity <= 3:
            raise ValueError(f"heatmap_min_severity: must be 0..3, got {self.heatmap_min_severity!r}")
        if not self.slice_tolerance_mm > 0:
            raise ValueError(f"slice_tolerance_mm: must be > 0, got {self.slice_tolerance_mm!r}")
        if not 0.0 <= self.low_confidence <= 1.0:
            raise ValueError(f"low_confidence: must be in [0, 1], got {self.low_confidence!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {self.max_batch!r}")
        bad = [lv for lv in self.graded_levels if lv not in DISCS]
        if bad:
            raise ValueError(f"graded_levels: not disc levels: {bad}")

    @classmethod
    def from_settings(cls, settings: Any | None) -> AnalysisOptions:
        """Options from any settings object: attributes with these names override the defaults."""
        if settings is None:
            return cls()
        kw = {
            name: getattr(settings, name)
            for name in cls.__dataclass_fields__
            if getattr(settings, name, None) is not None
        }
        if "graded_levels" in kw:
            kw["graded_levels"] = tuple(kw["graded_levels"])
        return cls(**kw)


@dataclass
class Run:
    """One study's analysis in progress."""

    result: StudyResult
    packages: ModelPackages
    options: AnalysisOptions
    used: dict[str, ModelInfo] = field(default_factory=dict)  # task -> provenance, once per task

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``result.timings[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t = self.result.timings
            t[name] = t.get(name, 0.0) + time.perf_counter() - t0

    def warn(self, message: str) -> None:
        log.info("study %s: %s", self.result.study_instance_uid, message)
        if message not in self.result.warnings:
            self.result.warnings.append(message)

    def model(self, task: str) -> Any | None:
        """The package for ``task``, recording it as used, or None with ``not_run`` filled."""
        obj = self.packages.get(task)
        if obj is None:
            self.result.not_run.setdefault(task, self.packages.reason(task))
            return None
        if self.packages.synthetic_only(task) and not self.options.report_synthetic_models:
            self.result.not_run.setdefault(task, SYNTHETIC_ONLY_REASON)
            return None
        missed = self.packages.below_target(task)
        if missed and not self.options.report_below_target_models:
            self.result.not_run.setdefault(task, f"{BELOW_TARGET_REASON} ({missed})")
            return None
        if task not in self.used:
            info = self.packages.info(task)
            if info is not None:
                self.used[task] = info
                self.result.models.append(info)
        return obj

    def not_run(self, task: str, why: str) -> None:
        self.result.not_run.setdefault(task, why)


def image_ref(volume: Volume, slice_index: int, row: float, column: float) -> ImageRef:
    """Reference to pixel (row, column) of image ``slice_index`` of ``volume``."""
    frame = volume.frames[slice_index] if volume.frames else 1
    return ImageRef(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        sop_instance_uid=volume.sop_instance_uids[slice_index],
        sop_class_uid=volume.sop_class_uid,
        row=float(row),
        column=float(column),
        frame=int(frame),
    )


def level_location(
    level: str, point_mm: Sequence[float], confidence: float, volume: Volume
) -> LevelLocation:
    """A located level, referenced on the image of ``volume`` nearest the point."""
    col, row, sl = volume.patient_to_voxel(np.asarray(point_mm, float))[0]
    n_s, n_r, n_c = volume.array.shape
    k = int(np.clip(np.rint(sl), 0, n_s - 1))
    return LevelLocation(
        level=level,
        point_mm=tuple(float(x) for x in point_mm),
        image=image_ref(volume, k, float(np.clip(row, 0, n_r - 1)), float(np.clip(col, 0, n_c - 1))),
        confidence=float(np.clip(confidence, 0.0, 1.0)),
    )


def localize(
    run: Run, array: np.ndarray, affine: np.ndarray, label: str, reference: Volume
) -> dict[str, tuple[np.ndarray, float]]:
    """Level points on a sagittal array: name -> (point mm, confidence); fills ``result.levels``.

    ``label`` names the input in messages ("the sagittal T2 series"); every
    level is referenced on the nearest image of ``reference`` (the input itself,
    or the source stack of a reformat). Returns an empty dict, with
    ``not_run`` or a warning saying why, when the localizer is missing, fails
    or finds nothing.
    """
    localizer = run.model("levels")
    if localizer is None:
        return {}
    with run.stage("localize"):
        try:
            out = localizer(np.asarray(array, np.float32), affine)
        except Exception as exc:  # a bad volume must not end the study
            run.warn(f"level localization failed on {label}: {type(exc).__name__}: {exc}")
            return {}
    for w in getattr(out, "warnings", ()) or ():
        run.warn(f"level localization: {w}")
    points: dict[str, tuple[np.ndarray, float]] = {}
    low = []
    for p in getattr(out, "points", ()) or ():
        conf = float(p.confidence)
        mm = np.asarray(p.point_mm, float)
        points[p.name] = (mm, conf)
        run.result.levels.append(level_location(p.name, mm, conf, reference))
        if conf < run.options.low_confidence:
            low.append(f"{p.name} ({conf:.2f})")
    if low:
        run.warn(f"low localization confidence (< {run.options.low_confidence:g}) at {', '.join(low)}")
    if not points:
        reason = getattr(out, "reason", None) or "no level found"
        run.warn(f"level localization on {label} found no level: {reason}")
    return points


def no_levels_reason(run: Run) -> str:
    """Why per-level analyses did not run when no disc was located."""
    missing = run.result.not_run.get("levels")
    return f"needs the level localizer, which is not available: {missing}" if missing else "no disc level located"


@dataclass
class CropJob:
    """One crop for one classifier at one level (and side), with where it came from."""

    task: str
    level: str
    side: str | None
    crop: np.ndarray
    geom: CropGeometry
    volume: Volume
    pick: SlicePick


def input_px(predictor: Any) -> int:
    """Side of the square crop a predictor was trained on.

    ``preprocessing["crop_px"]`` when the config has it (the predictor resizes
    crops to its network input itself), else the network input size.

    Raises
    ------
    ValueError
        If the config gives no usable size.
    """
    cfg = predictor.config
    pre = getattr(cfg, "preprocessing", None) or {}
    size = pre.get("crop_px") if isinstance(pre, dict) else None
    if size is None:
        size = getattr(cfg, "input_size", None)
    if isinstance(size, (tuple, list)):
        size = size[-1]
    if not isinstance(size, (int, np.integer)) or size < 2:
        raise ValueError(f"input_size: predictor config has no usable crop size ({size!r})")
    return int(size)


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2D image to ``shape`` (rows, columns), pixel centres aligned."""
    img = np.asarray(image, np.float32)
    rows, cols = shape
    if img.shape == (rows, cols):
        return img
    rr = (np.arange(rows) + 0.5) * img.shape[0] / rows - 0.5
    cc = (np.arange(cols) + 0.5) * img.shape[1] / cols - 0.5
    grid = np.meshgrid(rr, cc, indexing="ij")
    return ndimage.map_coordinates(img, grid, order=1, mode="nearest").astype(np.float32)


def crop_job(
    task: str,
    level: str,
    side: str | None,
    volumes: Sequence[Volume],
    disc_mm: Sequence[float],
    out_px: int,
    tolerance_mm: float,
    spec: CropSpec | None = None,
) -> tuple[CropJob | None, str]:
    """The crop of ``task`` at a disc point, on the nearest image of ``volumes``.

    The crop centre (disc point plus the spec's lateral/posterior offset) is
    moved onto the nearest image plane, so the crop is exactly that image's
    pixels resampled, and its heatmap maps back onto that image.

    Returns
    -------
    (CropJob or None, str)
        The job, or None with the reason no image was accepted.
    """
    spec = spec or CROP_SPECS[task]
    pick, why = pick_slice(volumes, offset_point(disc_mm, spec, side), tolerance_mm)
    if pick is None:
        return None, why
    vol = volumes[pick.volume_index]
    crop, geom, _, _ = crop_at_disc(vol.array, vol.affine, disc_mm, spec, out_px, side)
    return CropJob(task, level, side, crop, geom, vol, pick), ""


def grade_names(predictor: Any, condition: ConditionValues) -> list[str]:
    """The product's grade for each output class of ``predictor``.

    Class names that are the grades (in any order) map by name; otherwise the
    classes must be as many as the grades and map in order of severity.

    Raises
    ------
    ValueError
        If the classes cannot be mapped to the grades of ``condition``.
    """
    names = [str(c) for c in getattr(predictor.config, "class_names", ())]
    grades = GRADES[condition]
    norm = {g.replace("_", "/"): g for g in grades} | {g: g for g in grades}
    mapped = [norm.get(n.lower().replace(" ", "_")) or norm.get(n.lower()) for n in names]
    if names and all(mapped) and len(set(mapped)) == len(mapped):
        return [m for m in mapped if m]
    if len(names) == len(grades):
        return list(grades)
    raise ValueError(
        f"class_names: {names} cannot be mapped to the grades of {condition.value} {grades}"
    )


def _normalise(h: np.ndarray) -> np.ndarray:
    h = np.nan_to_num(np.asarray(h, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    h = np.clip(h, 0.0, None)
    m = float(h.max()) if h.size else 0.0
    return h / m if m > 0 else h


def classify(run: Run, jobs: Sequence[CropJob], condition: ConditionValues) -> list[Finding]:
    """Findings of one task; a model that fails leaves the task in ``not_run`` with the error.

    See :func:`_classify`.
    """
    if not jobs:
        return []
    try:
        return _classify(run, jobs, condition)
    except Exception as exc:  # one failing model must not cost the study its other findings
        log.exception("study %s: %s failed", run.result.study_instance_uid, jobs[0].task)
        run.not_run(jobs[0].task, f"the model failed: {type(exc).__name__}: {exc}")
        return []


def within_domain_filter(
    run: Run, predictor: Any, jobs: Sequence[CropJob], condition: ConditionValues,
    distances: Sequence[np.ndarray | None],
) -> np.ndarray:
    """Boolean ``[N]``: crops outside the package's validated input domain.

    Each such crop gets no finding, only a warning naming the level, the
    condition and the distance against the package's threshold.
    """
    domain = getattr(predictor, "domain", None)
    if domain is None or any(d is None for d in distances):
        return np.zeros(len(jobs), dtype=bool)
    dist = np.concatenate([np.asarray(d, float) for d in distances])
    out = dist > domain.threshold
    for j, d, o in zip(jobs, dist, out):
        if o:
            side = f" {getattr(j.side, 'value', j.side)}" if getattr(j, "side", None) is not None else ""
            run.warn(
                f"{j.level}{side} {condition.value}: finding withheld: the image is unlike those the model "
                f"was validated on (feature distance {d:.1f} > threshold {domain.threshold:.1f})"
            )
    return out


def _classify(run: Run, jobs: Sequence[CropJob], condition: ConditionValues) -> list[Finding]:
    """Run one task's classifier on all its crops, then Grad-CAM for graded findings.

    Crops go through the network in batches of at most ``options.max_batch``.
    Heatmaps are mapped back to the source image of each crop, normalised to
    [0, 1], and the finding's image point is the heatmap peak (the crop centre
    when no heatmap is computed).
    """
    task = jobs[0].task
    predictor = run.model(task)
    if predictor is None:
        return []
    try:
        grades = grade_names(predictor, condition)
    except ValueError as exc:
        run.not_run(task, str(exc))
        return []
    crops = np.stack([j.crop for j in jobs]).astype(np.float32)
    with run.stage("classify"):
        assess = getattr(predictor, "assess", None) or (lambda c: (predictor.predict(c), None))
        parts = [assess(crops[i : i + run.options.max_batch])
                 for i in range(0, len(crops), run.options.max_batch)]
    probs = np.concatenate([np.asarray(p, float) for p, _ in parts])
    outside = within_domain_filter(run, predictor, jobs, condition, [d for _, d in parts])
    if outside.all():
        return []
    keep = [i for i in range(len(jobs)) if not outside[i]]
    jobs, crops, probs = [jobs[i] for i in keep], crops[keep], probs[keep]
    cls = probs.argmax(axis=1)
    severity = [GRADES[condition].index(grades[c]) for c in cls]
    explain = [i for i, s in enumerate(severity) if s >= run.options.heatmap_min_severity]
    heat: dict[int, np.ndarray] = {}
    if explain:
        with run.stage("explain"):
            for start in range(0, len(explain), run.options.max_batch):
                idx = explain[start : start + run.options.max_batch]
                maps = np.asarray(predictor.explain(crops[idx], [int(cls[i]) for i in idx]))
                for i, m in zip(idx, maps):
                    j = jobs[i]
                    m = resize(m, j.crop.shape)  # the map may come at the network's input size
                    heat[i] = _normalise(
                        crop_to_image(m, j.geom, j.volume.affine, j.pick.slice_index, j.volume.array.shape[1:])
                    )
    info = run.used.get(task)
    findings = []
    for i, j in enumerate(jobs):
        h = heat.get(i)
        if h is not None and h.max() > 0:
            r, c = np.unravel_index(int(np.argmax(h)), h.shape)
        else:
            r, c = j.pick.row, j.pick.column
        findings.append(
            Finding(
                level=j.level,
                condition=condition,
                grade=grades[int(cls[i])],
                probabilities={g: float(p) for g, p in zip(grades, probs[i])},
                model=info.name if info else task,
                model_version=info.version if info else "unknown",
                image=image_ref(j.volume, j.pick.slice_index, float(r), float(c)),
                laterality=j.side,
                heatmap=h,
                calibrated=bool(getattr(getattr(predictor, "config", None), "calibration", None)),
            )
        )
    return findings
