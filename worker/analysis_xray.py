"""Lumbar X-ray (DX/CR): the whole image through paper C's classifier, with its heatmap.

There are no levels: the finding site is the lumbar spine. The image is resized
to the model's square input, and the Grad-CAM map is resized back onto the
source image's pixels.
"""

from __future__ import annotations

import logging

import numpy as np

from dicom_io.results import LUMBAR_SPINE, ConditionValues, Finding, GRADES
from dicom_io.volume import Volume
from worker.analysis import Run, grade_names, image_ref, input_px, resize

log = logging.getLogger(__name__)


def analyze_xray(run: Run, images: list[Volume]) -> None:
    """Fill ``run.result`` with one finding per X-ray image (each a single-image volume).

    A model that fails leaves ``xray`` in ``not_run`` with the error.
    """
    try:
        _analyze_xray(run, images)
    except Exception as exc:  # reported on the study, never raised into the worker
        log.exception("study %s: xray failed", run.result.study_instance_uid)
        run.not_run("xray", f"the model failed: {type(exc).__name__}: {exc}")


def _analyze_xray(run: Run, images: list[Volume]) -> None:
    predictor = run.model("xray")
    if predictor is None or not images:
        return
    condition = ConditionValues.SPINE_XRAY
    try:
        grades = grade_names(predictor, condition)
    except ValueError as exc:
        run.not_run("xray", str(exc))
        return
    px = input_px(predictor)
    with run.stage("crops"):
        batch = np.stack([resize(v.array[0], (px, px)) for v in images])
    with run.stage("classify"):
        probs = np.asarray(predictor.predict(batch), float)
    cls = probs.argmax(axis=1)
    info = run.used.get("xray")
    for i, vol in enumerate(images):
        grade = grades[int(cls[i])]
        heat = None
        r, c = (vol.array.shape[1] - 1) / 2.0, (vol.array.shape[2] - 1) / 2.0
        if GRADES[condition].index(grade) >= run.options.heatmap_min_severity:
            with run.stage("explain"):
                m = np.asarray(predictor.explain(batch[i : i + 1], [int(cls[i])]))[0]
                heat = np.clip(resize(m, vol.array.shape[1:]), 0.0, None)
                if heat.max() > 0:
                    heat /= heat.max()
                    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
        run.result.findings.append(
            Finding(
                level=LUMBAR_SPINE,
                condition=condition,
                grade=grade,
                probabilities={g: float(p) for g, p in zip(grades, probs[i])},
                model=info.name if info else "xray",
                model_version=info.version if info else "unknown",
                image=image_ref(vol, 0, float(r), float(c)),
                heatmap=heat,
            )
        )
