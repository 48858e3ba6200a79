"""SC encoders: valid objects, visible overlay and legend, same study/own series, bad input refused."""

from __future__ import annotations

import copy
import json
import shutil
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dicom_io.errors import EncodingError
from dicom_io.results import StudyResult
from dicom_io.sc import (
    HEATMAP_SERIES_DESCRIPTION,
    KEY_IMAGE_SERIES_DESCRIPTION,
    LEGEND_HEIGHT,
    count_outputs,
    encode_all,
    encode_heatmap_sc,
    encode_key_image,
    to_png,
)
from dicom_io.sr import read_sr, to_bytes
from dicom_io.validate import dciodvfy, dsrdump
from tests.sr_sources import full_result, make_source, roundtrip, xray_result


@pytest.fixture(scope="module")
def sources():
    return [make_source(i) for i in range(3)]


@pytest.fixture(scope="module")
def result(sources):
    return full_result(sources)


@pytest.fixture(scope="module")
def outputs(result, sources):
    return [roundtrip(ds) for ds in encode_all(result, {s.SOPInstanceUID: s for s in sources})]


def test_encode_all_makes_sr_heatmaps_and_key_image(outputs, result):
    sr, *scs = outputs
    assert sr.Modality == "SR" and len(read_sr(sr)) == len(result.findings)
    heatmaps = [d for d in scs if d.SeriesDescription == HEATMAP_SERIES_DESCRIPTION]
    keys = [d for d in scs if d.SeriesDescription == KEY_IMAGE_SERIES_DESCRIPTION]
    assert len(heatmaps) == len(result.findings) and len(keys) == 1
    series = {d.SeriesInstanceUID for d in outputs}
    assert len(series) == 3  # SR, heatmaps, key image: each its own series
    assert {d.StudyInstanceUID for d in outputs} == {result.study_instance_uid}
    assert len({d.SOPInstanceUID for d in outputs}) == len(outputs)


def test_sc_headers(outputs, sources):
    by_uid = {s.SOPInstanceUID: s for s in sources}
    for sc in outputs[1:]:
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert sc.BurnedInAnnotation == "YES"
        assert "not for diagnosis" in sc.SeriesDescription
        (src_ref,) = sc.SourceImageSequence
        src = by_uid[src_ref.ReferencedSOPInstanceUID]
        factor = sc.Columns / src.Columns
        assert factor == int(factor) and sc.Rows >= src.Rows * factor + LEGEND_HEIGHT
        assert [float(v) for v in sc.PixelSpacing] == pytest.approx(
            [float(v) / factor for v in src.PixelSpacing])
        assert sc.PatientOrientation == ["P", "F"]  # sagittal source: rows -> P, columns -> F
        assert sc.PatientName == src.PatientName
        assert any(e.Manufacturer == "Discus" for e in sc.ContributingEquipmentSequence)


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dicom3tools dciodvfy is not installed")
@pytest.mark.integration
def test_dciodvfy_accepts_every_object(outputs):
    for ds in outputs[:3] + outputs[-1:]:
        report = dciodvfy(ds)
        assert report.ok, (ds.SeriesDescription, report.errors)
    dsrdump(outputs[0])


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dicom3tools dciodvfy is not installed")
def test_xray_sc_without_image_orientation_is_valid():
    src = make_source(0, study_uid="1.2.3.4.5")
    src.Modality = "DX"
    del src.ImageOrientationPatient
    del src.ImagePositionPatient
    res = xray_result(src)
    sr, heat = encode_all(res, {src.SOPInstanceUID: src})
    assert heat.PatientOrientation == ""
    assert dciodvfy(heat).ok and dciodvfy(sr).ok


def test_png_shows_overlay_and_legend(outputs, tmp_path):
    heat, key = outputs[1], outputs[-1]
    for ds, name in ((heat, "heat.png"), (key, "key.png")):
        path = tmp_path / name
        to_png(ds, path)
        img = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert img.shape == (ds.Rows, ds.Columns, 3)
        assert img.std() > 10  # not blank
        legend = img[-LEGEND_HEIGHT:]
        # the legend band is dark with bright text on it
        assert np.median(legend) < 40 and (legend.max(axis=2) > 200).mean() > 0.01
        assert "not for diagnosis" in ds.ImageComments
    img = np.asarray(heat.pixel_array).astype(int)
    body = img[:-LEGEND_HEIGHT]
    colour = np.abs(body[..., 0] - body[..., 2])  # grey anatomy has R == B; heat does not
    assert (colour > 40).mean() > 0.002


def test_key_image_legend_separates_scales_and_shows_warnings(result, sources, tmp_path):
    from dicom_io.sc import GRADE_KEYS, _font, _key_legend_lines, encode_key_image

    r = copy.copy(result)
    r.warnings = ["possible transitional vertebra: levels counted from the sacrum only; check the count"]
    r.not_run = {"mr_foramen": "trained on synthetic data only; not validated on patient images"}
    mid = next(s for s in sources if s.SOPInstanceUID == r.levels[0].image.sop_instance_uid)
    plain = encode_key_image(result, mid)
    warned = encode_key_image(r, mid)
    assert warned.Rows > plain.Rows and warned.Columns == plain.Columns  # the band grows, nothing is cut
    font = _font(max(12, plain.Columns // 42))
    lines = _key_legend_lines(r, font, plain.Columns - 16)
    kinds = [k for k, _ in lines]
    assert kinds.count("keys") == 2  # stenosis grades and disc categories on their own lines
    assert {name for k, c in lines if k == "keys" for name in [c[0]]} == {n for n, _ in GRADE_KEYS}
    text = " ".join(str(c) for k, c in lines if k in ("warning", "models"))
    assert "transitional vertebra" in text and "mr_foramen" in text
    for m in r.models:
        assert f"{m.name} {m.version}" in text  # the model list is wrapped, never cut
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert all(measure.textlength(str(c), font=font) <= plain.Columns - 16
               for k, c in lines if k in ("warning", "models"))


def test_heat_is_where_the_heatmap_is(result, sources):
    f = copy.copy(result.findings[0])
    src = next(s for s in sources if s.SOPInstanceUID == f.image.sop_instance_uid)
    heat = np.zeros((src.Rows, src.Columns), np.float32)
    heat[150:170, 20:40] = 1.0  # away from the burned-in text
    f.heatmap = heat
    img = encode_heatmap_sc(f, src, result, 0).pixel_array.astype(int)
    factor = (img.shape[0] - LEGEND_HEIGHT) // src.Rows
    hot = img[150 * factor + 2:170 * factor - 2, 20 * factor + 2:40 * factor - 2]
    cold = img[100 * factor:120 * factor, 20 * factor:40 * factor]
    assert np.abs(hot[..., 0] - hot[..., 2]).mean() > 40
    assert np.abs(cold[..., 0] - cold[..., 2]).mean() < 3


def test_deterministic(result, sources):
    srcs = {s.SOPInstanceUID: s for s in sources}
    a = [to_bytes(d) for d in encode_all(result, srcs)]
    b = [to_bytes(d) for d in encode_all(result, srcs)]
    assert a == b


def test_min_severity_and_not_performed(result, sources):
    srcs = {s.SOPInstanceUID: s for s in sources}
    few = encode_all(result, srcs, min_severity=2)
    assert len(few) == 1 + sum(f.severity >= 2 for f in result.findings) + 1
    assert count_outputs(result, srcs, min_severity=2) == len(few)
    assert count_outputs(result, srcs) == len(encode_all(result, srcs)) > len(few)
    np_result = StudyResult(study_instance_uid=result.study_instance_uid, revision=1,
                            status="not_performed", reason="unsupported transfer syntax")
    (only,) = encode_all(np_result, srcs)
    assert only.Modality == "SR" and count_outputs(np_result, srcs) == 1


def test_iter_outputs_yields_the_sr_before_encoding_any_heatmap(result, sources, monkeypatch):
    import dicom_io.sc as sc

    srcs = {s.SOPInstanceUID: s for s in sources}
    made = []
    real = sc.encode_heatmap_sc
    monkeypatch.setattr(sc, "encode_heatmap_sc", lambda *a, **k: made.append(1) or real(*a, **k))
    stream = sc.iter_outputs(result, srcs)
    first = next(stream)
    assert first.Modality == "SR" and made == []  # the SR can be on its way before any heatmap exists
    rest = list(stream)
    assert len(made) == len(rest) - 1 and [to_bytes(d) for d in [first, *rest]] == \
        [to_bytes(d) for d in encode_all(result, srcs)]


def test_bad_input_names_the_field(result, sources):
    f = copy.copy(result.findings[0])
    src = next(s for s in sources if s.SOPInstanceUID == f.image.sop_instance_uid)
    f.heatmap = np.zeros((10, 10), np.float32)
    with pytest.raises(EncodingError, match="heatmap: shape"):
        encode_heatmap_sc(f, src, result, 0)
    f.heatmap = None
    with pytest.raises(EncodingError, match="heatmap"):
        encode_heatmap_sc(f, src, result, 0)
    f = copy.copy(result.findings[0])
    no_pixels = copy.deepcopy(src)
    del no_pixels.PixelData
    with pytest.raises(EncodingError, match=r"source\.PixelData"):
        encode_heatmap_sc(f, no_pixels, result, 0)
    no_rows = copy.deepcopy(src)
    del no_rows.Rows
    with pytest.raises(EncodingError, match=r"source\.Rows"):
        encode_heatmap_sc(f, no_rows, result, 0)
    other = next(s for s in sources if s.SOPInstanceUID != f.image.sop_instance_uid)
    with pytest.raises(EncodingError, match="SOPInstanceUID"):
        encode_heatmap_sc(f, other, result, 0)
    with pytest.raises(EncodingError, match="levels"):
        encode_key_image(result, _other_series(src))
    with pytest.raises(EncodingError, match="sources"):
        encode_all(result, {"1.2.3": src})


def _other_series(src):
    ds = copy.deepcopy(src)
    ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".1"
    return ds


@pytest.mark.integration
def test_orthanc_accepts_and_qido_lists_them(orthanc, outputs, sources):
    def post(data: bytes) -> dict:
        req = urllib.request.Request(orthanc.url + "/instances", data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=20) as resp:
            return json.loads(resp.read())

    for ds in (*sources, *outputs):
        answer = post(to_bytes(ds))
        assert answer["Status"] in ("Success", "AlreadyStored")
    study = outputs[0].StudyInstanceUID
    req = urllib.request.Request(f"{orthanc.dicomweb_url}/studies/{study}/instances",
                                 headers={"Accept": "application/dicom+json"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        listed = json.loads(resp.read())
    uids = {item["00080018"]["Value"][0] for item in listed}
    assert {str(d.SOPInstanceUID) for d in outputs} <= uids
    assert {str(s.SOPInstanceUID) for s in sources} <= uids


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dicom3tools dciodvfy is not installed")
def test_oblique_source_keeps_its_multi_letter_orientation():
    src = make_source(0, study_uid="1.2.3.4.6")
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    # an oblique sagittal: rows run posterior and head-wards, columns foot-wards
    src.ImageOrientationPatient = [0.0, c, s, 0.0, s, -c]
    res = full_result([src])
    heat = encode_heatmap_sc(res.findings[0], src, res, 0)
    assert list(heat.PatientOrientation) == ["PH", "FP"]
    assert dciodvfy(heat).ok, dciodvfy(heat).errors


def test_own_outputs_are_recognised_and_scanner_images_are_not(outputs, sources, tmp_path):
    from dicom_io.headers import is_own_output

    for i, ds in enumerate(outputs):  # the SR, the heatmaps and the key image
        path = tmp_path / f"out{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert is_own_output(path, str(ds.SOPClassUID)), ds.SeriesDescription
        assert not is_own_output(path, str(ds.SOPClassUID), manufacturer="Another AI")
    src = tmp_path / "src.dcm"
    sources[0].save_as(src, enforce_file_format=True)
    assert not is_own_output(src, str(sources[0].SOPClassUID))
    scanner_sc = copy.deepcopy(outputs[1])  # a scanner's own secondary capture: no processing equipment of ours
    del scanner_sc.ContributingEquipmentSequence
    scanner_sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    assert not is_own_output(tmp_path / "sc.dcm", str(scanner_sc.SOPClassUID))
