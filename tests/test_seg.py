"""The DICOM Segmentation of the spine masks, written and read back.

The masks here are synthetic: rectangles with the label values of the
segmentation model's scheme, drawn on a few images of a small synthetic
sagittal MR series; no model produced them.
"""

from __future__ import annotations

import io
import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_io.seg import SEG_SERIES_DESCRIPTION, build_segmentation, segment_label
from dicom_io.sr import to_bytes
from dicom_io.uids import deterministic_uid, device_uid
from dicom_io.validate import dciodvfy
from models.measurements import CANAL_LABEL, LABEL_NAMES, VERTEBRA_LABELS, disc_label
from tests.sr_sources import MODEL_SHA, make_source, model

ROWS, COLUMNS = 64, 48
SEG_SERIES = deterministic_uid("test-seg-series")
SEG_SOP = deterministic_uid("test-seg-sop")

# Synthetic masks: (label value, first row, last row + 1, first column, last column + 1).
L4, L4_L5, L5 = VERTEBRA_LABELS["L4"], disc_label("L4-L5"), VERTEBRA_LABELS["L5"]
BOXES = {
    0: [(L4, 10, 20, 5, 25), (L4_L5, 20, 24, 5, 25), (CANAL_LABEL, 0, 64, 30, 34)],
    2: [(L4, 12, 21, 6, 26), (L4_L5, 21, 25, 6, 26), (L5, 25, 36, 6, 26)],
}


def _mask(boxes: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    mask = np.zeros((ROWS, COLUMNS), dtype=np.uint8)
    for value, r0, r1, c0, c1 in boxes:
        mask[r0:r1, c0:c1] = value
    return mask


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return [make_source(i, rows=ROWS, columns=COLUMNS) for i in range(4)]


@pytest.fixture(scope="module")
def masks(sources) -> dict[str, np.ndarray]:
    out = {str(sources[i].SOPInstanceUID): _mask(boxes) for i, boxes in BOXES.items()}
    out[str(sources[3].SOPInstanceUID)] = _mask([])  # looked at, nothing found: no frame
    return out


def _build(sources, masks, labels=LABEL_NAMES, **kwargs):
    args = dict(model=model("segmentation"), series_instance_uid=SEG_SERIES, sop_instance_uid=SEG_SOP,
                series_number=9904)
    args.update(kwargs)
    return build_segmentation(sources, masks, labels, **args)


@pytest.fixture(scope="module")
def seg_bytes(sources, masks) -> bytes:
    return to_bytes(_build(sources, masks))


@pytest.fixture(scope="module")
def seg(seg_bytes) -> hd.seg.Segmentation:
    return hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(seg_bytes)))


def test_segments_labels_and_codes(seg):
    assert seg.SegmentationType == "BINARY"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["L4 vertebral body", "L4-L5 intervertebral disc", "L5 vertebral body", "Spinal canal"]
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2, 3, 4]
    for item in seg.SegmentSequence:
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.TrackingID == item.SegmentLabel
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("discus-grader", "1.2.0")
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert f"weights_sha256={MODEL_SHA}" in algorithm.AlgorithmParameters
    types = [(s.SegmentedPropertyTypeCodeSequence[0].CodeValue, s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
             for s in seg.SegmentSequence]
    assert types == [("11994002", "L4 vertebra"), ("84020006", "L4/L5 disc"), ("49668003", "L5 vertebra"),
                     ("61853006", "Vertebral canal")]
    assert len({s.TrackingUID for s in seg.SegmentSequence}) == 4


def test_frames_and_pixels_round_trip(seg, sources, masks):
    # Image 0: L4, L4-L5, canal; image 2: L4, L4-L5, L5; images 1 and 3: nothing.
    assert seg.NumberOfFrames == 6
    numbers = {v: i for i, v in enumerate((L4, L4_L5, L5, CANAL_LABEL), start=1)}
    for index in (0, 2):
        uid = str(sources[index].SOPInstanceUID)
        got = seg.get_pixels_by_source_instance(
            [uid], segment_numbers=[1, 2, 3, 4], combine_segments=True, skip_overlap_checks=True,
        )[0]
        expected = np.vectorize(lambda v: numbers.get(int(v), 0))(masks[uid])
        np.testing.assert_array_equal(got, expected)
    referenced = {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for f in seg.PerFrameFunctionalGroupsSequence}
    assert referenced == {str(sources[0].SOPInstanceUID), str(sources[2].SOPInstanceUID)}


def test_references_and_copied_modules(seg, sources):
    src = sources[0]
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert (seg.PatientName, seg.PatientID, seg.PatientBirthDate, seg.PatientSex) == (
        src.PatientName, src.PatientID, src.PatientBirthDate, src.PatientSex)
    assert seg.AccessionNumber == src.AccessionNumber
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence} == {
        str(sources[0].SOPInstanceUID), str(sources[2].SOPInstanceUID)}
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID, seg.SeriesNumber) == (SEG_SERIES, SEG_SOP, 9904)
    assert seg.SeriesDescription == SEG_SERIES_DESCRIPTION
    assert seg.Manufacturer == "Discus"
    assert seg.DeviceSerialNumber == device_uid(MODEL_SHA)
    (ours,) = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "Discus"]
    assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert (ours.ManufacturerModelName, ours.DeviceSerialNumber) == ("discus-grader", device_uid(MODEL_SHA))
    assert {str(s.DimensionOrganizationUID) for s in seg.DimensionIndexSequence} == {
        str(seg.DimensionOrganizationSequence[0].DimensionOrganizationUID)}
    assert (seg.ContentDate, seg.ContentTime) == ("20240102", "102102")  # the sources' latest


def test_deterministic(sources, masks, seg_bytes):
    assert to_bytes(_build(sources, masks)) == seg_bytes


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dicom3tools dciodvfy is not installed")
def test_dciodvfy_accepts_the_seg(seg_bytes, tmp_path):
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_bytes)
    report = dciodvfy(path)
    assert report.ok, report.errors
    assert "Segmentation" in report.iod


def test_empty_masks_raise(sources):
    empty = {str(ds.SOPInstanceUID): _mask([]) for ds in sources[:2]}
    with pytest.raises(ValueError, match="masks: every mask is empty"):
        _build(sources, empty)
    with pytest.raises(ValueError, match="masks: every mask is empty"):
        _build(sources, {})


def test_mask_of_another_shape_raises(sources, masks):
    uid = str(sources[0].SOPInstanceUID)
    bad = dict(masks)
    bad[uid] = np.zeros((COLUMNS, ROWS), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"masks\[.*\]: shape \(48, 64\) differs .*\(64, 48\)"):
        _build(sources, bad)


def test_bad_input_names_the_argument(sources, masks):
    uid = str(sources[0].SOPInstanceUID)
    with pytest.raises(ValueError, match=r"masks\[.*\]: label value\(s\) 7 not in labels"):
        _build(sources, {uid: np.full((ROWS, COLUMNS), 7, dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"masks\['1\.2\.3'\]: no source image"):
        _build(sources, {"1.2.3": masks[uid]})
    with pytest.raises(ValueError, match=r"labels\[23\]: level: 'L7'"):
        _build(sources, masks, {23: "L7"})
    with pytest.raises(ValueError, match="labels: each level needs one label value; repeated: L4"):
        _build(sources, masks, {**LABEL_NAMES, 99: "L4"})
    with pytest.raises(ValueError, match=r"masks\[.*\]: expected an integer label mask"):
        _build(sources, {uid: masks[uid].astype(np.float32)})
    other = make_source(0, rows=ROWS, columns=COLUMNS, study_uid=deterministic_uid("another study"))
    with pytest.raises(ValueError, match=r"sources\[1\]\.StudyInstanceUID"):
        _build([sources[0], other], {uid: masks[uid]})
    with pytest.raises(ValueError, match="model.sha256"):
        _build(sources, masks, model=model().__class__("m", "1", "seg", "not-a-hash"))
    with pytest.raises(TypeError, match="sources"):
        _build(sources[0], masks)


def test_every_level_of_the_model_scheme_has_a_segment():
    assert segment_label("L4") == "L4 vertebral body"
    assert segment_label("L5-S1") == "L5-S1 intervertebral disc"
    assert segment_label("canal") == "Spinal canal"
    source = make_source(0, rows=ROWS, columns=COLUMNS)
    mask = np.zeros((ROWS, COLUMNS), dtype=np.uint8)
    values = sorted(LABEL_NAMES)
    for i, value in enumerate(values):
        mask[i * 3: i * 3 + 2, :10] = value
    seg = _build([source], {str(source.SOPInstanceUID): mask})
    assert len(seg.SegmentSequence) == len(values) == seg.NumberOfFrames
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels[:3] == ["T9 vertebral body", "T9-T10 intervertebral disc", "T10 vertebral body"]
    assert labels[-3:] == ["L5-S1 intervertebral disc", "S1 vertebral body", "Spinal canal"]
    sacrum = seg.SegmentSequence[-2].SegmentedPropertyTypeCodeSequence[0]
    assert (sacrum.CodeValue, sacrum.CodeMeaning) == ("54735007", "Sacrum")
