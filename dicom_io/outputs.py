"""Everything Discus writes for one analysis, in one call (SR + SC images).

The worker's entry point; the encoders themselves live in :mod:`dicom_io.sr` and
:mod:`dicom_io.sc`. :func:`warm_up` runs them once on a tiny synthetic study, so the
first real study after a worker starts does not pay for loading highdicom's tables
of the standard, the colour map and the fonts (about half a second).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from dicom_io.results import GRADES, ConditionValues, Finding, ImageRef, LevelLocation, ModelInfo, StudyResult
from dicom_io.sc import encode_all
from dicom_io.uids import deterministic_uid

__all__ = ["encode_all", "warm_up"]


def _warm_up_source(size: int) -> Dataset:
    study = deterministic_uid("discus-warm-up", "study")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = deterministic_uid("discus-warm-up", "image")
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = deterministic_uid("discus-warm-up", "series")
    ds.FrameOfReferenceUID = deterministic_uid("discus-warm-up", "frame")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Warm^Up", "WARMUP", "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20000101", "000000", "", "1"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "MR", 1, 1
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(size * size, dtype=np.uint16).tobytes()
    return ds


def warm_up() -> int:
    """Encode and serialise the outputs of a tiny synthetic result once; return how many.

    Call it where a worker process starts (next to loading the models). Nothing is
    written to disk or sent anywhere.
    """
    size = 32
    source = _warm_up_source(size)
    ref = ImageRef(study_instance_uid=str(source.StudyInstanceUID),
                   series_instance_uid=str(source.SeriesInstanceUID),
                   sop_instance_uid=str(source.SOPInstanceUID), sop_class_uid=str(source.SOPClassUID),
                   row=size / 2, column=size / 2)
    condition = ConditionValues.DISC
    grades = GRADES[condition]
    finding = Finding(level="L4-L5", condition=condition, grade=grades[-1],
                      probabilities={g: 1.0 / len(grades) for g in grades}, model="warm-up",
                      model_version="0", image=ref,
                      heatmap=np.linspace(0.0, 1.0, size * size, dtype=np.float32).reshape(size, size))
    result = StudyResult(study_instance_uid=str(source.StudyInstanceUID), revision=1,
                         levels=[LevelLocation(level="L4-L5", point_mm=(0.0, 0.0, 0.0), image=ref,
                                               confidence=1.0)],
                         findings=[finding],
                         models=[ModelInfo(name="warm-up", version="0", task="mr_disc", sha256="0" * 64)])
    outputs = encode_all(result, {str(source.SOPInstanceUID): source})
    for ds in outputs:
        ds.save_as(BytesIO(), enforce_file_format=True)
    return len(outputs)
