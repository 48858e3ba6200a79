"""Real-world headers: missing type 2 attributes and malformed values never cost a study its results."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pydicom
import pytest

from dicom_io.headers import repair_header
from dicom_io.sc import encode_all
from dicom_io.validate import dciodvfy
from tests.sr_sources import full_result, make_source

TYPE2 = ["PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
         "PatientName", "PatientID", "ReferringPhysicianName"]
MALFORMED = [("PatientSex", "ZZZ"), ("StudyDate", "20241345"), ("StudyTime", "996161"),
             ("PatientBirthDate", "unknown"), ("PatientName", "X" * 200), ("PatientID", "Y" * 90),
             ("AccessionNumber", "A" * 40)]
VARIANTS = [("missing", k, None) for k in TYPE2] + [("invalid", k, v) for k, v in MALFORMED]


@pytest.fixture(scope="module")
def sources():
    return [make_source(i) for i in range(5)]


@pytest.mark.parametrize("kind,keyword,value", VARIANTS, ids=[f"{k}-{w}" for k, w, _ in VARIANTS])
def test_outputs_stay_valid_and_the_change_is_named(sources, kind: str, keyword: str, value: str | None) -> None:
    srcs = [copy.deepcopy(s) for s in sources]
    for s in srcs:
        if value is None:
            delattr(s, keyword)
        else:
            setattr(s, keyword, value)
        assert repair_header(s) == [f"{keyword} ({kind})"]
        assert keyword in s and s[keyword].value in ("", None)  # type 2: present and empty
    outs = encode_all(full_result(srcs, heatmaps=False), {s.SOPInstanceUID: s for s in srcs})
    assert outs
    if shutil.which("dciodvfy"):
        for ds in outs[:2] + outs[-1:]:
            report = dciodvfy(ds)
            assert report.ok, (keyword, report.errors)


def test_valid_headers_are_untouched_and_case_is_fixed(sources) -> None:
    s = copy.deepcopy(sources[0])
    before = {k: str(s[k].value) for k in TYPE2 if k in s}
    changed = repair_header(s)
    assert changed == [f"{k} (missing)" for k in TYPE2 if k not in before]  # only absent ones are added
    assert {k: str(s[k].value) for k in before} == before
    s.PatientSex = "f"
    assert repair_header(s) == ["PatientSex (upper-cased)"] and s.PatientSex == "F"


def test_a_study_with_a_broken_header_is_analysed_and_reported(tmp_path: Path) -> None:
    phantom = pytest.importorskip("dicom_io.phantom", reason="the phantom writer is not installed")
    from dicom_io.results import StatusValues
    from worker.model_packages import ModelPackages
    from worker.pipeline import analyze_study, encode_outputs

    src = tmp_path / "src"
    phantom.write_demo_study(src, "MR", seed=5)
    study = tmp_path / "study"
    study.mkdir()
    for i, f in enumerate(sorted(src.rglob("*.dcm"))):
        ds = pydicom.dcmread(f)
        del ds.PatientBirthDate, ds.AccessionNumber
        ds.PatientSex, ds.StudyDate, ds.StudyTime = "ZZZ", "20241345", "996161"
        ds.save_as(study / f"{i:05d}.dcm", enforce_file_format=True)
    res = analyze_study(study, 1, packages=ModelPackages.shared())
    assert res.status is StatusValues.ANALYSED, res.reason
    written = [pydicom.dcmread(p) for p in encode_outputs(res, study, tmp_path / "out")]
    sr = next(ds for ds in written if ds.Modality == "SR")
    assert sr.PatientSex == "" and sr.StudyDate == "" and sr.AccessionNumber == ""
    notes = [w for w in res.warnings if w.startswith("source header attributes")]
    assert notes and "StudyDate (invalid)" in notes[0] and "20241345" not in notes[0]  # names, never values
    if shutil.which("dciodvfy"):
        assert dciodvfy(sr).ok
