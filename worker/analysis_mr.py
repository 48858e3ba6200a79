"""MR lumbar study: levels on the sagittal series, then disc and stenosis grades per disc level.

Canal stenosis is read on the sagittal T2 (or STIR) image nearest each disc,
foraminal narrowing on the sagittal T1 images nearest the disc point moved
laterally to each side, disc grade and subarticular stenosis on the axial T2
image nearest the disc, found by projecting the disc point through the axial
stacks' geometry.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dicom_io.results import DISCS, ConditionValues, Finding
from dicom_io.volume import Volume
from models.crops import crop_to_image
from worker.analysis import (
    CropJob,
    Run,
    classify,
    crop_job,
    image_ref,
    input_px,
    localize,
    no_levels_reason,
    resize,
)
from worker.analysis_spine import measure_spine

#: Task of the sagittal disc grader and the condition of each of its binary heads.
DISC_GRADING = "mr_disc_grading"
BINARY_CONDITIONS: dict[str, ConditionValues] = {
    "narrowing": ConditionValues.DISC_NARROWING,
    "spondylolisthesis": ConditionValues.SPONDYLOLISTHESIS,
    "modic": ConditionValues.MODIC,
    "endplate_upper": ConditionValues.UPPER_ENDPLATE,
    "endplate_lower": ConditionValues.LOWER_ENDPLATE,
}

#: (task, condition, which series, sides) read per disc level.
MR_TASKS: tuple[tuple[str, ConditionValues, str, tuple[str | None, ...]], ...] = (
    ("mr_canal", ConditionValues.SPINAL_CANAL_STENOSIS, "sag_t2", (None,)),
    ("mr_foramen", ConditionValues.NEURAL_FORAMINAL_NARROWING, "sag_t1", ("L", "R")),
    ("mr_disc", ConditionValues.DISC, "axial", (None,)),
    ("mr_subarticular", ConditionValues.SUBARTICULAR_STENOSIS, "axial", ("L", "R")),
)

_SIDE_WORD = {None: "", "L": " left", "R": " right"}


def graded_discs(run: Run, points: dict[str, tuple[np.ndarray, float]]) -> list[str]:
    """Graded disc levels that were located, warning for each one that is not visible."""
    found = [lv for lv in run.options.graded_levels if lv in points]
    if points:
        for lv in run.options.graded_levels:
            if lv not in points:
                run.warn(f"level {lv} not visible on the sagittal series; not graded")
    return sorted(found, key=DISCS.index)


def analyze_mr(
    run: Run,
    sag_t2: Volume | None,
    sag_t1: Volume | None,
    axials: Sequence[Volume],
    *,
    sag_t2_label: str = "sagittal T2",
) -> None:
    """Fill ``run.result`` for an MR study from its selected volumes.

    Parameters
    ----------
    run
        The study's run state.
    sag_t2
        Sagittal T2 (or STIR) volume, or None if the study has none.
    sag_t1
        Sagittal T1 volume, or None.
    axials
        Axial T2 stacks (possibly several, one per angled block).
    sag_t2_label
        How to name the fluid-sensitive sagittal series in messages.
    """
    loc_vol, loc_label = (sag_t2, sag_t2_label) if sag_t2 is not None else (sag_t1, "sagittal T1")
    if sag_t2 is None:
        run.warn("no sagittal T2 or STIR series; canal stenosis read on the sagittal T1 instead")
    if sag_t1 is None:
        run.warn("no sagittal T1 series; foraminal narrowing read on the sagittal T2 instead")
    if not axials:
        run.warn("no axial T2 series; disc grade and subarticular stenosis not assessed")
        for task in ("mr_disc", "mr_subarticular"):
            run.not_run(task, "no axial T2 series in the study")
    if loc_vol is None:  # callers route studies without a sagittal series elsewhere
        raise ValueError("sag_t2/sag_t1: an MR analysis needs a sagittal series")
    points = localize(run, loc_vol.array, loc_vol.affine, f"the {loc_label} series", loc_vol)
    measure_spine(run, loc_vol, points)
    discs = graded_discs(run, points)
    if not discs:
        for task, *_ in MR_TASKS:
            run.not_run(task, no_levels_reason(run))
        return
    sources: dict[str, list[Volume]] = {
        "sag_t2": [v for v in (sag_t2 or sag_t1,) if v is not None],
        "sag_t1": [v for v in (sag_t1 or sag_t2,) if v is not None],
        "axial": list(axials),
    }
    graded = grade_discs(run, loc_vol, discs, points)
    for task, condition, source, sides in MR_TASKS:
        if not sources[source]:
            continue
        predictor = run.model(task)
        if predictor is None:
            continue
        # the disc category comes from the sagittal grader where it graded the disc
        todo = [lv for lv in discs if not (task == "mr_disc" and lv in graded)]
        jobs = _jobs(run, task, predictor, sources[source], todo, points, sides, source)
        if jobs:
            run.result.findings.extend(classify(run, jobs, condition))


def grade_discs(run: Run, volume: Volume, discs: list[str], points: dict[str, tuple[np.ndarray, float]]) -> set[str]:
    """Disc grading on the sagittal series: per disc the category, Pfirrmann grade and five findings.

    Each finding carries the package's calibrated probability of the reported
    grade; abnormal ones (a bulging or herniated disc, a finding present) get a
    Grad-CAM heatmap on the source image, whose peak is the finding's point. A
    disc whose crop lies outside the package's validated input domain gets no
    finding, only a warning. Returns the levels that got a disc category.
    """
    grader = run.model(DISC_GRADING)
    if grader is None or not discs:
        return set()
    try:
        with run.stage("classify"):
            grades = grader.grade(volume.array, volume.affine, {lv: points[lv][0] for lv in discs})
        grades = [g for g in grades if _in_domain(run, g, grader)]
        heads = abnormal_heads(grades)
        heat: dict[tuple[int, str], np.ndarray] = {}
        if heads:
            with run.stage("explain"):
                maps = grader.explain(np.stack([grades[i].crop for i, _ in heads]), [h for _, h in heads])
            for (i, h), m in zip(heads, maps):
                g = grades[i]
                m = resize(m, g.crop.shape)
                h_img = crop_to_image(m, g.geometry, volume.affine, g.slice_index, volume.array.shape[1:])
                peak = float(h_img.max()) if h_img.size else 0.0
                heat[(i, h)] = h_img / peak if peak > 0 else h_img
    except Exception as exc:  # a failing grader must not cost the study its other findings
        run.not_run(DISC_GRADING, f"the model failed: {type(exc).__name__}: {exc}")
        return set()
    info = run.used.get(DISC_GRADING)
    name, version = (info.name, info.version) if info else (DISC_GRADING, "unknown")
    for i, g in enumerate(grades):
        col, row, _ = volume.patient_to_voxel(np.asarray(g.point_mm, float))[0]

        def finding(condition: ConditionValues, grade: str, probs: dict[str, float], head: str | None) -> Finding:
            h = heat.get((i, head)) if head else None
            r, c = (np.unravel_index(int(np.argmax(h)), h.shape) if h is not None and h.max() > 0 else (row, col))
            return Finding(level=g.level, condition=condition, grade=grade, probabilities=probs, model=name,
                           model_version=version, image=image_ref(volume, g.slice_index, float(r), float(c)),
                           heatmap=h, calibrated=True)

        ph, pb = g.probabilities["herniation"], g.probabilities["bulging"]
        category = {"normal": (1 - ph) * (1 - pb), "bulging": (1 - ph) * pb, "herniation": ph}
        run.result.findings.append(finding(ConditionValues.DISC, g.category, category,
                                           g.category if g.category != "normal" else None))
        pf = {f"pfirrmann_{k + 1}": float(p) for k, p in enumerate(g.p_pfirrmann)}
        run.result.findings.append(finding(ConditionValues.PFIRRMANN, f"pfirrmann_{g.pfirrmann}", pf, None))
        for head, condition in BINARY_CONDITIONS.items():
            p = g.probabilities[head]
            present = g.findings[head]
            run.result.findings.append(finding(condition, "present" if present else "absent",
                                               {"absent": 1.0 - p, "present": p}, head if present else None))
    return {g.level for g in grades}


def _in_domain(run: Run, grade: Any, grader: Any) -> bool:
    if grade.in_domain:
        return True
    threshold = getattr(getattr(grader, "domain", None), "threshold", float("nan"))
    run.warn(f"{grade.level} disc grading: findings withheld: the image is unlike those the model was "
             f"validated on (feature distance {grade.domain_distance:.1f} > threshold {threshold:.1f})")
    return False


def abnormal_heads(grades: Sequence[Any]) -> list[tuple[int, str]]:
    """(disc index, head) of every abnormal output: the disc category and each finding present."""
    out = []
    for i, g in enumerate(grades):
        if g.category != "normal":
            out.append((i, g.category))
        out += [(i, h) for h in BINARY_CONDITIONS if g.findings[h]]
    return out


def _jobs(
    run: Run,
    task: str,
    predictor: Any,
    volumes: list[Volume],
    discs: list[str],
    points: dict[str, tuple[np.ndarray, float]],
    sides: tuple[str | None, ...],
    source: str,
) -> list[CropJob]:
    out_px = input_px(predictor)
    jobs: list[CropJob] = []
    with run.stage("crops"):
        for level in discs:
            for side in sides:
                job, why = crop_job(
                    task, level, side, volumes, points[level][0], out_px, run.options.slice_tolerance_mm
                )
                if job is None:
                    where = "axial T2" if source == "axial" else "sagittal"
                    run.warn(f"{task} at {level}{_SIDE_WORD[side]}: no {where} image used: {why}")
                    continue
                jobs.append(job)
    return jobs
