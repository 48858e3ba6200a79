"""CT lumbar study: sagittal reformat for the levels, then paper A's disc and level classifiers.

The axial stack is resampled into sagittal images (with their own affine) for the
level localizer; each located disc is then read on the axial image nearest it.
The CT level classifier says which disc an axial image shows; where it disagrees
with the geometric localization, the geometric level is reported and a warning
names both.
"""

from __future__ import annotations

import numpy as np

from dicom_io.results import ConditionValues
from dicom_io.volume import Volume
from models.crops import CROP_SPECS, CropSpec
from worker.analysis import CropJob, Run, classify, crop_job, input_px, localize, no_levels_reason
from worker.analysis_mr import graded_discs
from worker.geometry import sagittal_reformat

#: The level classifier's crop: its own spec when models.crops has one, else the disc classifier's
#: axial field of view.
CT_LEVEL_SPEC = CROP_SPECS["ct_level"]


#: Left-right extent of the sagittal reformat: wider than the band of images the localizer reads.
REFORMAT_WIDTH_MM = 120.0


def _localize_reformat(run: Run, axial: Volume) -> dict[str, tuple[np.ndarray, float]]:
    if run.model("levels") is None:
        return {}
    with run.stage("reformat"):
        array, affine = sagittal_reformat(axial, inplane_mm=1.0, slice_mm=2.0, width_mm=REFORMAT_WIDTH_MM)
    # The reformat is not an image of the study: levels refer to the nearest axial image.
    return localize(run, array, affine, "the sagittal reformat", axial)


def analyze_ct(run: Run, axial: Volume) -> None:
    """Fill ``run.result`` for a CT study from its axial stack."""
    points = _localize_reformat(run, axial)
    discs = graded_discs(run, points)
    if not discs:
        for task in ("ct_disc", "ct_level"):
            run.not_run(task, no_levels_reason(run))
        return
    disc_jobs = _jobs(run, "ct_disc", axial, discs, points)
    if disc_jobs:
        run.result.findings.extend(classify(run, disc_jobs, ConditionValues.DISC))
    try:
        _check_levels(run, axial, discs, points)
    except Exception as exc:  # the level check is advisory; its failure is reported, not raised
        run.not_run("ct_level", f"the model failed: {type(exc).__name__}: {exc}")


def _jobs(
    run: Run,
    task: str,
    axial: Volume,
    discs: list[str],
    points: dict[str, tuple[np.ndarray, float]],
    spec: CropSpec | None = None,
) -> list[CropJob]:
    predictor = run.model(task)
    if predictor is None:
        return []
    out_px = input_px(predictor)
    jobs = []
    with run.stage("crops"):
        for level in discs:
            job, why = crop_job(
                task, level, None, [axial], points[level][0], out_px, run.options.slice_tolerance_mm, spec
            )
            if job is None:
                run.warn(f"{task} at {level}: no axial image used: {why}")
                continue
            jobs.append(job)
    return jobs


def _check_levels(
    run: Run, axial: Volume, discs: list[str], points: dict[str, tuple[np.ndarray, float]]
) -> None:
    """Compare the CT level classifier with the geometric level on each disc's axial image."""
    predictor = run.model("ct_level")
    if predictor is None:
        return
    classes = [str(c) for c in getattr(predictor.config, "class_names", ())]
    # The classifier knows only some levels (paper A: L3-L4, L4-L5, L5-S1).
    known = [lv for lv in discs if lv in classes]
    if not known:
        run.not_run("ct_level", f"none of the located discs is a class of the level model {classes}")
        return
    jobs = _jobs(run, "ct_level", axial, known, points, CT_LEVEL_SPEC)
    if not jobs:
        return
    crops = np.stack([j.crop for j in jobs]).astype(np.float32)
    with run.stage("classify"):
        probs = np.asarray(predictor.predict(crops), float)
    for j, p in zip(jobs, probs):
        said = classes[int(np.argmax(p))]
        if said != j.level:
            run.warn(
                f"CT level check: the level classifier reads the {j.level} image as {said} "
                f"(p={float(np.max(p)):.2f}); reporting the geometric level {j.level}"
            )
