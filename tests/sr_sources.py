"""Small source MR images and StudyResults for the SR / SC encoder tests.

The images are a crude sagittal lumbar phantom (vertebral bodies as bright
rounded blocks, discs between them), enough to see overlays on; they carry
every header the encoders copy.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from dicom_io.results import (
    DISCS,
    GRADES,
    LATERALIZED,
    LUMBAR_SPINE,
    ConditionValues,
    Finding,
    ImageRef,
    LevelLocation,
    ModelInfo,
    StudyResult,
)
from dicom_io.uids import deterministic_uid

STUDY_UID = deterministic_uid("test-study")
SERIES_UID = deterministic_uid("test-series")
LUMBAR_LEVELS = ("L1", "L2", "L3", "L4", "L5", "S1")
LUMBAR_DISCS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
MODEL_SHA = "ab" * 32


def phantom(rows: int = 192, columns: int = 160, seed: int = 0) -> np.ndarray:
    """A sagittal phantom: six vertebral bodies with discs, uint16."""
    rng = np.random.default_rng(seed)
    img = rng.normal(180, 25, size=(rows, columns)).clip(0)
    yy, xx = np.mgrid[0:rows, 0:columns]
    height = rows / 7.0
    for i in range(6):
        cy = height * (i + 0.9)
        body = ((np.abs(yy - cy) / (height * 0.38)) ** 4 + (np.abs(xx - columns * 0.45) / (columns * 0.16)) ** 4) < 1
        img[body] = 700 + 40 * i
    canal = np.abs(xx - columns * 0.68) < columns * 0.05
    img[canal] = 1100
    return img.astype(np.uint16)


def level_point(level: str, rows: int = 192, columns: int = 160) -> tuple[float, float]:
    """(row, column) of a level's centre on :func:`phantom`."""
    height = rows / 7.0
    if level in LUMBAR_LEVELS:
        return height * (LUMBAR_LEVELS.index(level) + 0.9), columns * 0.45
    upper = level.split("-")[0]
    return height * (LUMBAR_LEVELS.index(upper) + 1.4), columns * 0.45


def make_source(
    index: int = 0,
    *,
    rows: int = 192,
    columns: int = 160,
    patient_name: str = "Doe^Jane",
    charset: str | None = None,
    study_uid: str = STUDY_UID,
) -> Dataset:
    """A single-frame sagittal MR image with full patient/study/geometry headers."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    sop_uid = deterministic_uid("test-sop", study_uid, str(index))
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = deterministic_uid("test-series", study_uid)
    ds.FrameOfReferenceUID = deterministic_uid("test-for", study_uid)
    ds.PatientName = patient_name
    ds.PatientID = "P0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesDate = "20240102"
    ds.SeriesTime = "102000"
    ds.ContentDate = "20240102"
    ds.ContentTime = f"1021{index % 60:02d}"
    ds.ReferringPhysicianName = ""
    ds.Modality = "MR"
    ds.Manufacturer = "Phantom"
    ds.SeriesNumber = 3
    ds.InstanceNumber = index + 1
    ds.SeriesDescription = "SAG T2"
    ds.BodyPartExamined = "LSPINE"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = 100
    ds.RepetitionTime = 3000
    ds.SliceThickness = 4.0
    ds.PixelSpacing = [0.8, 0.8]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-10.0 + 4.0 * index, -80.0, 100.0]
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    ds.EchoTrainLength = 16
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 700
    ds.WindowWidth = 1400
    ds.PixelData = phantom(rows, columns, seed=index).tobytes()
    return ds


def ref(ds: Dataset, row: float, column: float) -> ImageRef:
    return ImageRef(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        row=row,
        column=column,
    )


def heatmap_at(ds: Dataset, row: float, column: float, sigma: float = 10.0) -> np.ndarray:
    yy, xx = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
    return np.exp(-((yy - row) ** 2 + (xx - column) ** 2) / (2 * sigma**2)).astype(np.float32)


def probabilities(condition: ConditionValues, grade: str, p: float = 0.7) -> dict[str, float]:
    grades = GRADES[condition]
    rest = (1.0 - p) / (len(grades) - 1)
    return {g: (p if g == grade else rest) for g in grades}


def model(task: str = "lumbar") -> ModelInfo:
    return ModelInfo(name="discus-grader", version="1.2.0", task=task, sha256=MODEL_SHA,
                     parameters={"input": "128x128", "folds": "5"})


def full_result(sources: list[Dataset], *, revision: int = 1, heatmaps: bool = True) -> StudyResult:
    """Findings on every lumbar disc: all MR conditions, both sides, grades cycling."""
    mid = sources[len(sources) // 2]
    levels = [
        LevelLocation(level=lv, point_mm=(0.0, float(i), float(-i)), image=ref(mid, *level_point(lv)),
                      confidence=0.9)
        for i, lv in enumerate(LUMBAR_LEVELS + LUMBAR_DISCS)
    ]
    findings = []
    k = 0
    for disc in LUMBAR_DISCS:
        row, col = level_point(disc)
        for cond in (ConditionValues.DISC, ConditionValues.SPINAL_CANAL_STENOSIS,
                     ConditionValues.NEURAL_FORAMINAL_NARROWING, ConditionValues.SUBARTICULAR_STENOSIS):
            sides = ("L", "R") if cond in LATERALIZED else (None,)
            for side in sides:
                grade = GRADES[cond][k % 3]
                k += 1
                src = sources[k % len(sources)]
                findings.append(Finding(
                    level=disc, condition=cond, grade=grade,
                    probabilities=probabilities(cond, grade, 0.5 + 0.04 * (k % 10)),
                    model="discus-grader", model_version="1.2.0", image=ref(src, row, col),
                    laterality=side,
                    heatmap=heatmap_at(src, row, col) if heatmaps else None,
                ))
    return StudyResult(study_instance_uid=str(mid.StudyInstanceUID), revision=revision,
                       levels=levels, findings=findings, models=[model()])


def xray_result(source: Dataset, grade: str = "scoliosis") -> StudyResult:
    f = Finding(level=LUMBAR_SPINE, condition=ConditionValues.SPINE_XRAY, grade=grade,
                probabilities=probabilities(ConditionValues.SPINE_XRAY, grade, 0.8),
                model="discus-xray", model_version="0.3.1", image=ref(source, 90.0, 80.0),
                heatmap=heatmap_at(source, 90.0, 80.0, 30.0))
    return StudyResult(study_instance_uid=str(source.StudyInstanceUID), revision=1, modality="DX",
                       findings=[f], models=[ModelInfo("discus-xray", "0.3.1", "xray", "cd" * 32)])


def all_discs() -> tuple[str, ...]:
    return DISCS


def roundtrip(ds: Dataset) -> Dataset:
    """Write and read back, as a receiver would see the object."""
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)
