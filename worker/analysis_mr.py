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

from dicom_io.results import DISCS, ConditionValues
from dicom_io.volume import Volume
from worker.analysis import CropJob, Run, classify, crop_job, input_px, localize, no_levels_reason

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
    for task, condition, source, sides in MR_TASKS:
        if not sources[source]:
            continue
        predictor = run.model(task)
        if predictor is None:
            continue
        jobs = _jobs(run, task, predictor, sources[source], discs, points, sides, source)
        if jobs:
            run.result.findings.extend(classify(run, jobs, condition))


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
