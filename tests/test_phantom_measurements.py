"""Spine measurements on the phantoms against the generator's truth (training.phantom_measurements).

The model-free check measures the generator's own bodies, discs and sac, rasterised on the
midline image of the sagittal T2 (1 mm pixels by default), with models.measurements: it tests
the measurement code against an independent truth. Tolerances follow from the pixel: a length
between two mask borders is off by up to half a pixel at each end, so single lengths are
allowed 1.5 px (the borders plus the line's position and tilt on a curved endplate) and their
mean absolute error 0.6 px; slip rests on two corner constructions (an endplate line meeting a
wall line each), so 2.5 px per value; lordosis on two fitted endplate lines, 3 degrees.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from models import measurements as M
from training.phantom_measurements import (
    compare,
    main,
    model_free_rows,
    parse_seeds,
    phantom_anatomy,
    summarize,
    truth_measurements,
)
from training.segmentation_eval import default_package

LENGTHS = (M.ANTERIOR_BODY_HEIGHT, M.MIDDLE_BODY_HEIGHT, M.POSTERIOR_BODY_HEIGHT, M.DISC_HEIGHT_ANTERIOR,
           M.DISC_HEIGHT_MIDDLE, M.DISC_HEIGHT_POSTERIOR, M.CANAL_AP_DIAMETER)


def _pixel_mm(seed: int) -> float:
    from dicom_io.phantom import mr_geometry

    aff, _, _ = mr_geometry(phantom_anatomy(seed), "sagittal")
    return float(np.linalg.norm(aff[:3, 0]))


def _errors(rows: list[dict], name: str) -> np.ndarray:
    return np.array([r["measured"] - r["truth"] for r in rows if r["measurement"] == name and r["measured"] != ""])


def _check(rows: list[dict], px: float) -> None:
    for name in LENGTHS:
        err = _errors(rows, name)
        assert len(err), name
        assert np.abs(err).max() <= 1.5 * px, (name, err)
        assert np.abs(err).mean() <= 0.6 * px, (name, err)
    slip = _errors(rows, M.SLIP)
    assert len(slip) and np.abs(slip).max() <= 2.5 * px, slip
    lordosis = _errors(rows, M.LORDOSIS)
    assert len(lordosis) and np.abs(lordosis).max() <= 3.0, lordosis
    for name in M.MEASUREMENT_NAMES:
        if name == M.CANAL_AP_DIAMETER:
            continue  # the measurement keeps the sac's largest piece only; a cut sac loses levels
        todo = [r for r in rows if r["measurement"] == name]
        assert all(r["measured"] != "" for r in todo), (name, [r for r in todo if r["measured"] == ""])


def test_truth_follows_the_generator() -> None:
    """The sampled truth agrees with the generator's parameters where they define it directly."""
    from dicom_io.phantom import mr_geometry

    anatomy = phantom_anatomy(0)
    aff, shape, _ = mr_geometry(anatomy, "sagittal")
    truth = truth_measurements(anatomy, aff, shape[0] // 2)
    for name, v in anatomy.vertebrae.items():
        if name == "S1":
            continue
        # concave endplates: 0.8 mm each in the middle, less towards the rim
        assert v.height - 1.8 < truth[(name, M.MIDDLE_BODY_HEIGHT)] < v.height - 1.3
        assert v.height - 1.4 < truth[(name, M.ANTERIOR_BODY_HEIGHT)] < v.height
    for name, d in anatomy.discs.items():
        # the disc fills the endplates' concavities, about 0.8 mm each
        assert d.height + 1.0 < truth[(name, M.DISC_HEIGHT_MIDDLE)] < d.height + 2.0
        assert truth[(name, M.DISC_HEIGHT_ANTERIOR)] > truth[(name, M.DISC_HEIGHT_POSTERIOR)]
        if (name, M.CANAL_AP_DIAMETER) in truth and d.findings.disc == "normal":
            # the sac's depth at the disc; less on an image off the spine's midline (the sac is an ellipse across)
            sac = (d.canal_depth - 4.4) * np.sqrt(d.canal_area)
            assert sac - 2.0 < truth[(name, M.CANAL_AP_DIAMETER)] < sac + 0.3
        assert abs(truth[(name, M.SLIP)]) < 2.0  # no slip on this seed
    assert abs(truth[(M.LORDOSIS_LEVEL, M.LORDOSIS)] - anatomy.variation["lordosis_deg"]) < 3.0


def test_truth_has_the_slip_and_the_stenosis() -> None:
    """A slipped seed's truth holds its slip; a severe stenosis narrows the sac."""
    from dicom_io.phantom import mr_geometry

    anatomy = phantom_anatomy(2)
    level = anatomy.variation["slip_level"]
    aff, shape, _ = mr_geometry(anatomy, "sagittal")
    truth = truth_measurements(anatomy, aff, shape[0] // 2)
    below = {"L4": "L4-L5", "L5": "L5-S1"}[level]
    # the generator slips along the patient's AP axis; the slip is taken along the sloping lower endplate
    slope = np.radians(anatomy.variation["sacral_slope_deg"] + 5.0)
    assert truth[(below, M.SLIP)] > np.cos(slope) * anatomy.variation["slip_mm"]
    assert (below, M.CANAL_AP_DIAMETER) not in truth
    anatomy = phantom_anatomy(1)  # L1-L2 severe
    aff, shape, _ = mr_geometry(anatomy, "sagittal")
    truth = truth_measurements(anatomy, aff, shape[0] // 2)
    canal = {d.findings.canal: truth[(n, M.CANAL_AP_DIAMETER)] for n, d in anatomy.discs.items()
             if (n, M.CANAL_AP_DIAMETER) in truth}
    assert canal["severe"] < 5.0 < 8.0 < canal["normal_mild"]


def test_model_free_one_phantom() -> None:
    rows = model_free_rows(0)
    _check(rows, _pixel_mm(0))
    stats = summarize(rows)
    assert stats[M.DISC_HEIGHT_MIDDLE]["n"] == stats[M.DISC_HEIGHT_MIDDLE]["n_truth"] == 6


@pytest.mark.slow
def test_model_free_phantoms() -> None:
    rows = [r for seed in range(6) for r in model_free_rows(seed)]
    _check(rows, max(_pixel_mm(s) for s in range(6)))
    # a slipped segment is measured as such
    slipped = [r for r in rows if r["measurement"] == M.SLIP and r["truth"] > 5.0]
    assert slipped and all(r["measured"] > 5.0 for r in slipped)


def test_compare_and_summary() -> None:
    truth = {("L4", M.MIDDLE_BODY_HEIGHT): 25.0, ("L4-L5", M.DISC_HEIGHT_MIDDLE): 10.0}
    measured = M.SagittalMeasurements((M.Measurement("L4", M.MIDDLE_BODY_HEIGHT, 26.0, "mm"),), ())
    rows = compare(3, measured, truth)
    assert rows == [{"seed": 3, "level": "L4", "measurement": M.MIDDLE_BODY_HEIGHT, "unit": "mm", "measured": 26.0,
                     "truth": 25.0},
                    {"seed": 3, "level": "L4-L5", "measurement": M.DISC_HEIGHT_MIDDLE, "unit": "mm", "measured": "",
                     "truth": 10.0}]
    stats = summarize(rows)
    assert stats[M.MIDDLE_BODY_HEIGHT]["n"] == 1 and stats[M.MIDDLE_BODY_HEIGHT]["bias"] == 1.0
    assert M.DISC_HEIGHT_MIDDLE not in stats  # nothing measured, nothing to summarise


def test_parse_seeds() -> None:
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0,4,7-8") == [0, 4, 7, 8]
    for bad in ("a", "3-1", "1-b"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


def test_main_model_free_writes_and_reads_back(tmp_path, capsys) -> None:
    assert main(["--seeds", "1", "--model-free", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "phantom_measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"seed", "level", "measurement", "unit", "measured", "truth"}
    report = json.loads((tmp_path / "phantom_measurements.json").read_text())
    assert report["seeds"] == [1] and report["measurements"][M.SLIP]["n"] > 0
    assert M.DISC_HEIGHT_MIDDLE in capsys.readouterr().out


@pytest.mark.slow
def test_shipped_package_on_a_phantom(tmp_path) -> None:
    """Smoke test of the worker's path with the shipped package; no accuracy is asserted."""
    package = default_package()
    if not (package / "config.json").is_file():
        pytest.skip(f"no shipped spine_segmentation package at {package.name} (it is trained separately)")
    assert main(["--seeds", "0", "--package", str(package), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "phantom_measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["truth"] != "" for r in rows)
    report = json.loads((tmp_path / "phantom_measurements.json").read_text())
    assert "0" in report["cases"]
