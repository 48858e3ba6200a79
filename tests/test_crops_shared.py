"""Training and inference cut the same pixels: one crop path (models.crops.crop_at_disc)."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.volume import Volume
from models.crops import CROP_SPECS, crop_at_disc, snap_to_plane
from training.synthetic import _cut
from worker.analysis import crop_job

phantom = pytest.importorskip("dicom_io.phantom", reason="the phantom writer is not installed")


def _volume(series: "phantom.RenderedSeries") -> Volume:
    n = series.array.shape[0]
    return Volume(np.asarray(series.array, np.float32), np.asarray(series.affine, float),
                  [f"1.2.3.{i + 1}" for i in range(n)])


@pytest.mark.parametrize("task,contrast,plane", [
    ("mr_canal", "T2", "sagittal"), ("mr_foramen", "T1", "sagittal"),
    ("mr_disc", "T2", "axial"), ("mr_subarticular", "T2", "axial"),
])
def test_training_and_inference_crops_are_identical(task: str, contrast: str, plane: str) -> None:
    anat = phantom.make_anatomy(7)
    series = phantom.render_mr(anat, contrast, plane)
    vol = _volume(series)
    spec = CROP_SPECS[task]
    sides = ("L", "R") if spec.mirror_right else (None,)
    levels = anat.levels_mm()
    compared = 0
    for disc in phantom.LUMBAR_DISCS:
        p = np.asarray(levels[disc], float)
        for side in sides:
            trained = _cut(series, p, spec, 64, side, np.zeros(3))
            job, why = crop_job(task, disc, side, [vol], p, 64, tolerance_mm=50.0)
            assert job is not None, why
            assert np.array_equal(trained, job.crop), (task, disc, side)
            compared += 1
    assert compared >= 5


def test_ct_level_has_its_own_crop_spec() -> None:
    assert CROP_SPECS["ct_level"].task == "ct_level" and CROP_SPECS["ct_level"].plane == "axial"


def test_snap_moves_along_the_normal_onto_the_nearest_plane() -> None:
    affine = np.array([[0, 0, 3.0, -6], [0.5, 0, 0, 0], [0, -0.5, 0, 0], [0, 0, 0, 1]])  # sagittal, 3 mm
    snapped, k, dist = snap_to_plane(affine, 5, np.array([1.2, 10.0, -4.0]))
    assert k == 2 and abs(dist) == pytest.approx(1.2) and snapped == pytest.approx([0.0, 10.0, -4.0])
    # beyond the stack: the end image, with its true distance
    _, k, dist = snap_to_plane(affine, 5, np.array([30.0, 0, 0]))
    assert k == 4 and abs(dist) == pytest.approx(24.0)
    crop, geom, k2, _ = crop_at_disc(np.ones((5, 40, 40), np.float32), affine, np.array([1.2, 10.0, -4.0]),
                                     CROP_SPECS["mr_canal"], 16)
    assert k2 == 2 and geom.center_mm[0] == pytest.approx(0.0) and crop.shape == (16, 16)
