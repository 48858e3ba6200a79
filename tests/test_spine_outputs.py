"""Spine measurements in the results: SR groups with UCUM numbers and grades, draft report, SEG, key image lines.

The masks are synthetic rectangles drawn on the small phantom of ``tests.sr_sources``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dicom_io.results import MeasurementCategory, ModelInfo, SegmentationMasks, SpineMeasurement, StudyResult
from dicom_io.sc import count_outputs, encode_key_image, iter_outputs
from dicom_io.sr import encode_sr, read_draft_report, read_measurements, read_sr
from dicom_io.validate import dciodvfy
from models.measurements import LABEL_NAMES, VERTEBRA_LABELS, disc_label, measure_sagittal
from tests.sr_sources import full_result, make_source, roundtrip
from worker.analysis_spine import _outline, draft_report

SEG_MODEL = ModelInfo(name="discus-spine-segmentation", version="9.9.9", task="spine_segmentation", sha256="cd" * 32)


def synthetic_mask(rows: int = 192, columns: int = 160) -> np.ndarray:
    """Bodies L1-L5 (22 px tall), discs (8 px) between and below them, a canal behind: synthetic."""
    m = np.zeros((rows, columns), np.int16)
    top = 10
    names = ["L1", "L2", "L3", "L4", "L5"]
    for i, name in enumerate(names):
        r0 = top + i * 30
        m[r0:r0 + 22, 50:90] = VERTEBRA_LABELS[name]
        disc = f"{name}-{names[i + 1]}" if i + 1 < len(names) else "L5-S1"
        m[r0 + 22:r0 + 30, 52:88] = disc_label(disc)
    m[10:170, 96:104] = 200  # canal 8 px = 6.4 mm at 0.8 mm: absolute stenosis everywhere
    return m


@pytest.fixture(scope="module")
def sources():
    return [make_source(i) for i in range(3)]


@pytest.fixture(scope="module")
def measured_result(sources):
    result: StudyResult = full_result(sources, heatmaps=False)
    result.models.append(SEG_MODEL)
    src = sources[1]
    mask = synthetic_mask()
    m = measure_sagittal(mask, (0.8, 0.8))
    from tests.sr_sources import ref

    outlines = {lv: _outline(mask, lv) for lv in {x.level for x in m.measurements}}
    for x in m.measurements:
        r, c = np.mean(np.asarray(x.points or outlines[x.level] or [(96, 80)], float), axis=0)
        result.measurements.append(SpineMeasurement(
            level=x.level, name=x.name, value=x.value, unit=x.unit, image=ref(src, r, c), points=x.points,
            basis=x.basis, model=SEG_MODEL.name, model_version=SEG_MODEL.version,
            region=outlines.get(x.level) or x.points))
    for cat in m.categories:
        result.categories.append(MeasurementCategory(level=cat.level, name=cat.name, value=cat.value, basis=cat.basis,
                                                     image=ref(src, 96, 80), model=SEG_MODEL.name,
                                                     model_version=SEG_MODEL.version))
    labels = {int(v): LABEL_NAMES[int(v)] for v in np.unique(mask) if v}
    result.segmentation = SegmentationMasks(str(src.SeriesInstanceUID), {str(src.SOPInstanceUID): mask}, labels,
                                            SEG_MODEL.name, SEG_MODEL.version)
    result.draft_report = draft_report(result)
    return result


def test_draft_report_says_what_was_measured_and_that_it_is_a_draft(measured_result):
    text = measured_result.draft_report
    assert text.startswith("AI-GENERATED DRAFT")
    assert "L3-L4: canal AP diameter 6.4 mm (absolute stenosis)" in text
    assert "L3: vertebral body height anterior/middle/posterior 17.6/17.6/17.6 mm." in text


def test_sr_carries_measurements_grades_and_draft_report(measured_result, sources):
    ds = roundtrip(encode_sr(measured_result, sources))
    rows = read_measurements(ds)
    canal = [r for r in rows if r["level"] == "L3-L4" and r["name"] == "Canal AP diameter"]
    assert canal and canal[0]["unit"] == "mm" and canal[0]["value"] == pytest.approx(6.4, abs=0.8)
    heights = [r for r in rows if r["level"] == "L2" and r["name"] == "Middle body height"]
    assert heights and heights[0]["value"] == pytest.approx(17.6, abs=0.8)
    grades = {(r["level"], r["name"]): r["value"] for r in rows if r["unit"] == ""}
    assert grades[("L3-L4", "Central canal stenosis by AP diameter")].startswith("Absolute stenosis")
    assert read_draft_report(ds) == measured_result.draft_report
    # the graded findings read back as before: measurement groups are kept apart
    assert len(read_sr(ds)) == len(measured_result.findings)
    if shutil.which("dciodvfy"):
        assert dciodvfy(ds).ok, dciodvfy(ds).errors


def test_seg_goes_out_with_the_sr_and_validates(measured_result, sources, tmp_path):
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    outputs = list(iter_outputs(measured_result, by_uid))
    assert len(outputs) == count_outputs(measured_result, by_uid)
    segs = [d for d in outputs if d.Modality == "SEG"]
    assert len(segs) == 1
    seg = roundtrip(segs[0])
    labels = {str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert {"L3 vertebral body", "L4-L5 intervertebral disc", "Spinal canal"} <= labels
    if shutil.which("dciodvfy"):
        assert dciodvfy(seg).ok


def test_key_image_draws_the_measured_lines(measured_result, sources):
    src = sources[1]
    with_lines = np.asarray(encode_key_image(measured_result, src).pixel_array)
    plain = StudyResult(**{**{k: getattr(measured_result, k) for k in (
        "study_instance_uid", "revision", "series", "levels", "findings", "models", "not_run", "warnings")}})
    without = np.asarray(encode_key_image(plain, src).pixel_array)
    green = (with_lines[..., 0] == 120) & (with_lines[..., 1] == 255) & (with_lines[..., 2] == 120)
    assert green.sum() > green.size * 0.001
    assert ((without[..., 0] == 120) & (without[..., 1] == 255) & (without[..., 2] == 120)).sum() < green.sum() / 10


def test_result_json_round_trips_measurements(measured_result):
    back = StudyResult.from_json(measured_result.to_json())
    assert back.measurements == measured_result.measurements
    assert back.categories == measured_result.categories
    assert back.draft_report == measured_result.draft_report
    assert back.segmentation is None  # masks travel as the SEG, not as JSON


def test_measurement_with_bad_level_or_points_is_refused(sources):
    from tests.sr_sources import ref

    r = ref(sources[0], 10, 10)
    with pytest.raises(ValueError, match="level"):
        SpineMeasurement(level="L9", name="slip", value=1.0, unit="mm", image=r)
    with pytest.raises(ValueError, match="points"):
        SpineMeasurement(level="L4-L5", name="slip", value=1.0, unit="mm", image=r, points=((1, 2),))
    with pytest.raises(ValueError, match="value"):
        SpineMeasurement(level="L4", name="slip", value=float("nan"), unit="mm", image=r)


def test_only_validated_structures_and_measurements_are_reported():
    from worker.analysis_spine import Validation

    table = {"structures": {"vertebral body": {"dice": 0.93, "target": 0.9, "meets_target": True},
                            "disc": {"dice": 0.8, "target": 0.88, "meets_target": False}},
             "measurements": {"canal AP diameter": {"mae": 0.7, "unit": "mm", "icc_a1": 0.93, "meets_target": True},
                              "slip": {"mae": 1.6, "unit": "mm", "icc_a1": 0.6, "meets_target": False}},
             "categories": {"central canal stenosis": {"meets_target": True}, "Meyerding grade": {"meets_target": False}}}
    gate = Validation({"postprocessing": {"validated": table}}, allow_all=False)
    assert gate.measurement("canal AP diameter") and not gate.measurement("slip")
    assert not gate.measurement("lordosis L1-S1")  # not in the table: not validated
    assert gate.category("central canal stenosis") and not gate.category("Meyerding grade")
    assert gate.mae("canal AP diameter") == 0.7
    mask = synthetic_mask()
    kept = gate.seg_mask(mask)
    assert (kept == VERTEBRA_LABELS["L3"]).any() and not ((kept > 100) & (kept < 200)).any()
    assert not (kept == 200).any()  # the canal has no Dice entry: not validated
    why = gate.withheld()
    assert "slip (MAE 1.6 mm, ICC 0.60)" in why["spine measurements"]
    assert "disc (Dice 0.80 < 0.88)" in why["spine segmentation"]
    # a site that allows packages below target gets everything, nothing listed as withheld
    everything = Validation({"postprocessing": {"validated": table}}, allow_all=True)
    assert everything.measurement("slip") and np.array_equal(everything.seg_mask(mask), mask)
    assert everything.withheld() == {}
    # a package without the table reports nothing
    assert not Validation({}, allow_all=False).measurement("canal AP diameter")
