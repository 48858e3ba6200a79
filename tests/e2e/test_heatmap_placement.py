"""Heatmap placement: a left herniation at L4-L5 puts the heatmap peak on the left half of that disc.

The mirror case (a right herniation, peak on the right half) is run too, so
that a left-right flip anywhere between the crop and the source image fails.

Runs the pipeline and the SR/SC encoders on a synthetic MR study with the
shipped models (no daemon needed: the SC overlays exactly the finding's
heatmap on the image the finding references, which is checked here too). The
disc classifier and Grad-CAM are judged with the phantom's true level points
("true levels") and with the shipped localizer's ("shipped localizer"), so that
the product as shipped, not only the classifier, is held to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.results import ConditionValues
from tests.phantom_settings import PHANTOMS
from worker.model_packages import ModelPackages
from worker.pipeline import analyze_study, encode_outputs

pytestmark = [pytest.mark.slow]


def _geometry(folder: Path, sop_uid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, row direction * column spacing, column direction * row spacing) of one image."""
    for f in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.SOPInstanceUID == sop_uid:
            iop = np.array(ds.ImageOrientationPatient, float)
            row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
            return np.array(ds.ImagePositionPatient, float), iop[:3] * col_mm, iop[3:] * row_mm
    raise AssertionError(f"no source image {sop_uid}")




# The pipeline's inverse map itself is checked with lesion-tracking maps in test_pipeline_analysis;
# here the shipped disc model's Grad-CAM must find the phantom's posterolateral herniation.
@pytest.mark.parametrize("levels", ["true levels", "shipped localizer"])
@pytest.mark.parametrize("side", ["L", "R"])
@pytest.mark.parametrize("seed", [7])
def test_herniation_heatmap_on_its_half_of_the_disc(seed: int, side: str, levels: str, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from dicom_io.phantom import LevelFindings, write_demo_study

    packages = ModelPackages.shared()
    for task in ("levels", "mr_disc"):
        if packages.get(task) is None:
            pytest.skip(f"model package {task} not installed: {packages.reason(task)}")
    findings = {"L4-L5": LevelFindings(disc="herniation", disc_side=side)}
    truth = json.loads(Path(write_demo_study(tmp_path / "study", "MR", seed=seed, findings=findings)).read_text())
    folder = tmp_path / "study"
    if levels == "true levels":

        class Oracle:
            config = {"name": "phantom-levels", "version": "truth", "task": "levels", "sha256": "0" * 64}

            def __call__(self, array, affine):
                pts = [SimpleNamespace(name=k, point_mm=tuple(v), voxel=(0, 0, 0), confidence=1.0)
                       for k, v in truth["levels"].items()]
                return SimpleNamespace(points=pts, warnings=[], reason=None)

        packages = ModelPackages.from_loaded({**packages.loaded, "levels": Oracle()})
    result = analyze_study(folder, 1, packages=packages, settings=PHANTOMS)
    disc = [f for f in result.findings if f.condition is ConditionValues.DISC and f.level == "L4-L5"]
    assert disc, (result.not_run, result.warnings)
    f = disc[0]
    assert f.severity >= 1, f"L4-L5 herniation graded {f.grade} ({f.probabilities})"
    assert f.heatmap is not None
    origin, du, dv = _geometry(folder, f.image.sop_instance_uid)
    r, c = np.unravel_index(int(np.argmax(f.heatmap)), f.heatmap.shape)
    assert (r, c) == (round(f.image.row), round(f.image.column))  # the SR point is the peak
    peak_mm = origin + c * du + r * dv
    centre = np.array(truth["levels"]["L4-L5"])
    offset = peak_mm - centre
    print(f"peak {peak_mm.round(1)}, disc centre {centre.round(1)}, offset {offset.round(1)} mm (+x = left)")
    sign = 1.0 if side == "L" else -1.0  # +x is the patient's left
    assert sign * offset[0] > 0, f"{side} herniation: heatmap peak is on the other side of the disc centre"
    assert np.linalg.norm(offset[:2]) < 30.0, "heatmap peak is off the disc"
    # The SC overlay for this finding is on the same source image.
    files = encode_outputs(result, folder, tmp_path / "out")
    sc = [pydicom.dcmread(p) for p in files[1:]]
    refs = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in sc if "SourceImageSequence" in ds}
    assert f.image.sop_instance_uid in refs
