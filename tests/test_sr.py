"""SR encoder: standard tools accept it, it reads back, it is reproducible, bad input is refused."""

from __future__ import annotations

import copy
import shutil

import highdicom as hd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_io import codes
from dicom_io.errors import EncodingError
from dicom_io.results import (
    DISCS,
    GRADES,
    LATERALIZED,
    VERTEBRAE,
    ConditionValues,
    Finding,
    StudyResult,
)
from dicom_io.sr import encode_not_performed_sr, encode_sr, read_sr, read_status, to_bytes
from dicom_io.uids import device_uid, output_uids
from dicom_io.validate import dciodvfy, dsrdump
from tests.sr_sources import (
    MODEL_SHA,
    full_result,
    make_source,
    model,
    probabilities,
    ref,
    roundtrip,
    xray_result,
)

needs_tools = pytest.mark.skipif(
    not (shutil.which("dciodvfy") and shutil.which("dsrdump")),
    reason="dicom3tools dciodvfy and DCMTK dsrdump are needed (Debian dicom3tools, dcmtk)",
)


@pytest.fixture(scope="module")
def sources():
    return [make_source(i) for i in range(5)]


@pytest.fixture(scope="module")
def result(sources):
    return full_result(sources, heatmaps=False)


@pytest.fixture(scope="module")
def sr(result, sources):
    return roundtrip(encode_sr(result, sources))


def _empty(sources) -> StudyResult:
    return StudyResult(study_instance_uid=str(sources[0].StudyInstanceUID), revision=1,
                       models=[model()])


def _not_performed(sources) -> StudyResult:
    return StudyResult(study_instance_uid=str(sources[0].StudyInstanceUID), revision=1,
                       status="not_performed", reason="no sagittal T2 series found")


@needs_tools
@pytest.mark.integration
def test_standard_tools_accept_every_kind_of_sr(result, sources):
    xsrc = make_source(0, study_uid="1.2.3.4.5")
    xsrc.Modality = "DX"
    objects = {
        "all levels/conditions/sides": encode_sr(result, sources),
        "no findings": encode_sr(_empty(sources), sources),
        "x-ray": encode_sr(xray_result(xsrc), [xsrc]),
        "not performed": encode_not_performed_sr(_not_performed(sources), sources),
    }
    for name, ds in objects.items():
        report = dciodvfy(ds)
        assert report.iod == "Comprehensive3DSR", name
        assert report.ok, f"{name}: {report.errors}"
        text = dsrdump(ds)
        assert "Imaging Measurement Report" in text, name
    text = dsrdump(objects["not performed"])
    assert "no sagittal T2 series found" in text
    assert "No algorithms succeeded" in text


def test_round_trip_full(result, sr):
    got = read_sr(sr)
    assert len(got) == len(result.findings) == 30
    want = {
        (f.level, f.condition.value, f.laterality.value if f.laterality else None): f
        for f in result.findings
    }
    assert len(want) == 30  # every (level, condition, side) once
    for g in got:
        f = want[(g["level"], g["condition"], g["laterality"])]
        assert g["grade"] == f.grade
        assert g["probability"] == pytest.approx(f.probability, abs=1e-6)
        assert g["sop_instance_uid"] == f.image.sop_instance_uid
        assert g["row"] == pytest.approx(f.image.row, abs=1e-3)
        assert g["column"] == pytest.approx(f.image.column, abs=1e-3)
        assert (g["model"], g["model_version"]) == ("discus-grader", "1.2.0")
    sides = {g["laterality"] for g in got}
    assert sides == {None, "L", "R"}


def test_header_contract(result, sources, sr):
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert "AI-generated" in sr.SeriesDescription and "not a diagnosis" in sr.SeriesDescription
    assert sr.SeriesDescription.endswith("(revision 1)")  # a viewer's series list tells revisions apart
    assert sr.StudyInstanceUID == result.study_instance_uid
    assert sr.PatientName == sources[0].PatientName and sr.PatientID == "P0001"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {str(s.SOPInstanceUID) for s in sources}
    ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "Discus"]
    assert len(ours) == 1
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert ours[0].DeviceSerialNumber == device_uid(MODEL_SHA)
    assert ours[0].ManufacturerModelName == "discus-grader"
    assert ours[0].SoftwareVersions == "1.2.0"
    assert any(s.CodingSchemeDesignator == codes.LOCAL_SCHEME
               for s in sr.CodingSchemeIdentificationSequence)
    series_uid, sop_uid = output_uids(result.study_instance_uid, 1, ["discus-grader:1.2.0"], "sr")
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (series_uid, sop_uid)
    # Every group carries algorithm identification, a probability in {ratio} and a point.
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = report.get_planar_roi_measurement_groups()
    assert len(groups) == 30
    for g in groups:
        names = {(i.name.value, i.name.scheme_designator) for i in g[0].ContentSequence}
        assert ("111001", "DCM") in names and ("111003", "DCM") in names
        (m,) = (g.get_measurements(name=codes.code("probability"))
                + g.get_measurements(name=codes.code("probability_uncalibrated")))
        assert m.unit.value == "{ratio}"
        assert g.roi.graphic_type.value == "POINT"


def test_summary_says_whether_there_were_findings(sr, sources):
    assert read_status(sr) == ("All algorithms succeeded; with findings", None)
    empty = roundtrip(encode_sr(_empty(sources), sources))
    assert read_status(empty)[0] == "All algorithms succeeded; without findings"
    assert read_sr(empty) == []


def test_probability_names_what_it_is_and_withheld_analyses_are_listed(result, sources):
    r = copy.copy(result)
    r.findings = [copy.copy(f) for f in result.findings]
    r.findings[0].calibrated = True
    r.not_run = {"mr_foramen": "trained on synthetic data only; not validated on patient images"}
    r.warnings = ["levels counted from the sacrum only"]
    ds = roundtrip(encode_sr(r, sources))
    text = dsrdump(ds)
    assert "Calibrated probability of the reported grade" in text
    assert "Uncalibrated model score for the reported grade" in text  # the other 29
    assert '"Probability"' not in text
    def comments(items):
        for item in items:
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == "Comment":
                yield str(item.TextValue)
            yield from comments(getattr(item, "ContentSequence", []))

    notes = list(comments(ds.ContentSequence))
    assert notes == ["Not reported: mr_foramen: trained on synthetic data only; not validated on patient images",
                     "Warning: levels counted from the sacrum only"]
    assert len(read_sr(ds)) == len(r.findings)
    if shutil.which("dciodvfy"):
        report = dciodvfy(ds)
        assert report.ok, report


def test_procedure_reported_is_the_imaging_procedure(sr):
    text = str(sr)
    assert "24968-0" in text and "MR Lumbar spine" in text


def test_deterministic_bytes_and_uids(result, sources):
    a, b = to_bytes(encode_sr(result, sources)), to_bytes(encode_sr(result, sources))
    assert a == b
    reordered = to_bytes(encode_sr(result, list(reversed(sources))))
    assert reordered == a
    r2 = copy.copy(result)
    r2.revision = 2
    other = encode_sr(r2, sources)
    assert other.SOPInstanceUID != encode_sr(result, sources).SOPInstanceUID


def test_new_revision_lists_predecessor(result, sources, sr):
    r2 = copy.copy(result)
    r2.revision = 2
    new = roundtrip(encode_sr(r2, sources, predecessor=sr))
    (study,) = new.PredecessorDocumentsSequence
    item = study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert item.ReferencedSOPInstanceUID == sr.SOPInstanceUID
    assert new.InstanceNumber == 2 and new.SeriesDescription.endswith("(revision 2)")
    with pytest.raises(EncodingError, match="predecessor"):
        encode_sr(result, sources, predecessor=sr)  # revision 1 has none


@pytest.mark.parametrize(
    "charset, name",
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("ISO_IR 192", "Dvořák^Zoë=山田^太郎"),
    ],
)
def test_non_ascii_patient_names_survive(charset, name):
    srcs = [make_source(i, patient_name=name, charset=charset) for i in range(2)]
    srcs = [roundtrip(s) for s in srcs]
    res = full_result(srcs, heatmaps=False)
    ds = roundtrip(encode_sr(res, srcs))
    assert str(ds.PatientName) == name
    want = srcs[0].SpecificCharacterSet
    if not isinstance(want, str) and want[0] == "":
        want = ["ISO 2022 IR 6", *want[1:]]  # same repertoire, spelled as highdicom accepts
    assert ds.SpecificCharacterSet == want
    if shutil.which("dciodvfy"):
        assert dciodvfy(ds).ok


def test_not_performed_sr(sources):
    ds = roundtrip(encode_not_performed_sr(_not_performed(sources), sources))
    assert read_sr(ds) == []
    assert read_status(ds) == ("No algorithms succeeded; without findings",
                               "no sagittal T2 series found")
    assert ds.VerificationFlag == "UNVERIFIED"
    with pytest.raises(EncodingError, match="status"):
        encode_sr(_not_performed(sources), sources)
    with pytest.raises(EncodingError, match="status"):
        encode_not_performed_sr(_empty(sources), sources)


def test_bad_input_names_the_field(result, sources):
    bad = copy.deepcopy(result)
    bad.findings[0].level = "L9-L10"  # dataclass validated at construction; mutate after
    with pytest.raises(EncodingError, match=r"findings\[0\]\.level"):
        encode_sr(bad, sources)
    stripped = copy.deepcopy(sources)
    del stripped[1].PatientID
    with pytest.raises(EncodingError, match=r"sources\[1\]\.PatientID"):
        encode_sr(result, stripped)
    with pytest.raises(EncodingError, match=r"image\.sop_instance_uid"):
        encode_sr(result, sources[:1])
    with pytest.raises(EncodingError, match="sources"):
        encode_sr(result, [])
    other = make_source(0, study_uid="1.2.3")
    with pytest.raises(EncodingError, match="StudyInstanceUID"):
        encode_sr(result, [other, *sources])
    off = copy.deepcopy(result)
    off.findings[0] = Finding(**{**off.findings[0].__dict__, "image": ref(sources[1], 500.0, 3.0)})
    with pytest.raises(EncodingError, match="row/column"):
        encode_sr(off, sources)
    bad_model = copy.deepcopy(result)
    bad_model.models[0].sha256 = "not-a-hash"
    with pytest.raises(ValueError, match="sha256"):
        encode_sr(bad_model, sources)


_CONDITION_LEVELS = {c: DISCS for c in ConditionValues if c is not ConditionValues.SPINE_XRAY}


@st.composite
def random_results(draw, sources):
    n = draw(st.integers(min_value=0, max_value=8))
    seen = set()
    findings = []
    for _ in range(n):
        cond = draw(st.sampled_from(sorted(_CONDITION_LEVELS, key=lambda c: c.value)))
        level = draw(st.sampled_from(DISCS + VERTEBRAE))
        side = draw(st.sampled_from(["L", "R"])) if cond in LATERALIZED else None
        if (level, cond, side) in seen:
            continue
        seen.add((level, cond, side))
        grade = draw(st.sampled_from(GRADES[cond]))
        p = draw(st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
        src = draw(st.sampled_from(sources))
        row = draw(st.floats(min_value=0.0, max_value=float(src.Rows - 1)))
        col = draw(st.floats(min_value=0.0, max_value=float(src.Columns - 1)))
        findings.append(Finding(level=level, condition=cond, grade=grade,
                                probabilities=probabilities(cond, grade, p), model="m",
                                model_version=draw(st.sampled_from(["1", "2.0.1"])),
                                image=ref(src, row, col), laterality=side))
    return StudyResult(study_instance_uid=str(sources[0].StudyInstanceUID), revision=1,
                       findings=findings, models=[model()])


_PROPERTY_SOURCES = [make_source(i, rows=64, columns=48) for i in range(3)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_results(_PROPERTY_SOURCES))
def test_round_trip_property(res):
    got = read_sr(roundtrip(encode_sr(res, _PROPERTY_SOURCES)))
    key = lambda d: (d["level"], d["condition"], d["laterality"])  # noqa: E731
    want = sorted(
        ({"level": f.level, "condition": f.condition.value,
          "laterality": f.laterality.value if f.laterality else None, "grade": f.grade,
          "probability": f.probability, "model_version": f.model_version} for f in res.findings),
        key=key,
    )
    got = sorted(got, key=key)
    assert [key(g) for g in got] == [key(w) for w in want]
    for g, w in zip(got, want):
        assert g["grade"] == w["grade"]
        assert g["probability"] == pytest.approx(w["probability"], abs=1e-6)
        assert g["model_version"] == w["model_version"]


def test_xray_findings_read_back_one_per_image():
    """The X-ray evaluation shares its concept name with the finding type; it still reads back."""
    import dataclasses

    from dicom_io.sr import encode_sr, read_sr
    from tests.sr_sources import make_source, roundtrip, xray_result

    ap, lat = make_source(0, study_uid="1.2.3.4.7"), make_source(1, study_uid="1.2.3.4.7")
    for src in (ap, lat):
        src.Modality = "DX"
    res = xray_result(ap, grade="scoliosis")
    normal = xray_result(lat, grade="normal").findings[0]
    res.findings.append(dataclasses.replace(normal, heatmap=None))
    back = read_sr(roundtrip(encode_sr(res, [ap, lat])))
    assert [(g["condition"], g["grade"], g["sop_instance_uid"]) for g in back] == [
        ("spine_xray", "scoliosis", ap.SOPInstanceUID),
        ("spine_xray", "normal", lat.SOPInstanceUID),
    ]
    assert len({g["tracking_uid"] for g in back}) == 2
