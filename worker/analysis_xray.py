"""Spine X-ray (DX/CR): each whole image through a classifier, with its heatmap.

AP views go to the ``xray`` package (normal / scoliosis, trained on real AP
radiographs); lateral views go to ``xray_spondylolisthesis`` (trained on
synthetic phantoms only, so it reports only where the site allows synthetic-only
models). There are no levels: the finding site is the lumbar spine. The image is
resized whole to the model's square input (:func:`models.preprocess.resize_image`,
antialiased when the package was trained so), and the Grad-CAM map is resized back
onto the source image's pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np

from dicom_io.results import GRADES, LUMBAR_SPINE, ConditionValues, Finding
from dicom_io.volume import Volume
from models.preprocess import resize_image
from worker.analysis import Run, grade_names, image_ref, input_px, resize

log = logging.getLogger(__name__)

#: Task of the AP-view package and of the lateral-view package.
AP_TASK, LATERAL_TASK = "xray", "xray_spondylolisthesis"


def analyze_xray(run: Run, images: list[Volume], lateral: Collection[str] = ()) -> None:
    """Fill ``run.result`` with one finding per X-ray image (each a single-image volume).

    ``lateral`` holds the series UIDs of lateral views; every other image is
    taken as an AP view. A model that fails leaves its task in ``not_run`` with the error.
    """
    views = {AP_TASK: [v for v in images if v.series_instance_uid not in lateral],
             LATERAL_TASK: [v for v in images if v.series_instance_uid in lateral]}
    for task, vols in views.items():
        if not vols:
            continue
        try:
            _analyze(run, task, vols)
        except Exception as exc:  # reported on the study, never raised into the worker
            log.exception("study %s: %s failed", run.result.study_instance_uid, task)
            run.not_run(task, f"the model failed: {type(exc).__name__}: {exc}")


def _analyze(run: Run, task: str, images: list[Volume]) -> None:
    predictor = run.model(task)
    if predictor is None:
        return
    condition = ConditionValues.SPINE_XRAY
    try:
        grades = grade_names(predictor, condition)
    except ValueError as exc:
        run.not_run(task, str(exc))
        return
    px = input_px(predictor)
    antialias = bool(predictor.config.preprocessing.get("antialias", False))  # as the package was trained
    with run.stage("crops"):
        batch = np.stack([resize_image(v.array[0], (px, px), antialias=antialias) for v in images])
    with run.stage("classify"):
        assess = getattr(predictor, "assess", None)
        probs, dist = assess(batch) if assess is not None else (predictor.predict(batch), None)
        probs = np.asarray(probs, float)
    cls = probs.argmax(axis=1)
    info = run.used.get(task)
    domain = getattr(predictor, "domain", None)
    for i, vol in enumerate(images):
        if dist is not None and domain is not None and dist[i] > domain.threshold:
            run.warn(f"radiograph {vol.sop_instance_uids[0]}: {task} finding withheld: the image is unlike those "
                     f"the model was validated on (feature distance {dist[i]:.1f} > threshold {domain.threshold:.1f})")
            continue
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
                model=info.name if info else task,
                model_version=info.version if info else "unknown",
                image=image_ref(vol, 0, float(r), float(c)),
                heatmap=heat,
                calibrated=bool(getattr(predictor.config, "calibration", None)),
            )
        )
