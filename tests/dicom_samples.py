"""Small DICOM datasets built with pydicom for the dicom_io tests.

Each image encodes its own slice index in its pixels (``pixels[0, 0] == index``)
so tests can check slice order after loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import sop_class

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run anterior->posterior... normal along x
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal along z
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal along y


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    """Slice normal (row direction x column direction) of an ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=float)
    return np.cross(o[:3], o[3:])


def make_image(
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    modality: str = "MR",
    sop_class_uid: str | None = None,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = SAGITTAL,
    pixel_spacing: Sequence[float] | None = (0.5, 0.5),
    pixels: np.ndarray | None = None,
    rows: int = 16,
    columns: int = 12,
    index: int = 0,
    description: str = "",
    patient_name: str = "Doe^Jane",
    **extra: object,
) -> Dataset:
    """One image dataset with file meta, explicit VR little endian, 16-bit unsigned."""
    if sop_class_uid is None:
        sop_class_uid = {
            "MR": sop_class.MRImageStorage,
            "CT": sop_class.CTImageStorage,
            "DX": sop_class.DigitalXRayImageStorageForPresentation,
            "CR": sop_class.ComputedRadiographyImageStorage,
        }[modality]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame of reference"])
    ds.PatientName = patient_name
    ds.PatientID = "P123"
    ds.AccessionNumber = "A1"
    ds.StudyDescription = "LUMBAR SPINE"
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 4.0
    if pixels is None:
        pixels = np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) % 251
        pixels[0, 0] = index
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def write_stack(
    folder: Path,
    n: int,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    orientation: Sequence[float] = SAGITTAL,
    origin: Sequence[float] = (-20.0, -50.0, 60.0),
    step: float = 4.0,
    order: Sequence[int] | None = None,
    **kwargs: object,
) -> list[Path]:
    """Write ``n`` parallel slices, ``step`` mm apart along the normal, in ``order``.

    Slice ``k`` (0-based along the normal) sits at ``origin + k * step * normal``
    and has ``pixels[0, 0] == k``. Files are named by write order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    normal = normal_of(orientation)
    paths = []
    for i, k in enumerate(order if order is not None else range(n)):
        ds = make_image(
            study_uid=study_uid,
            series_uid=series_uid,
            position=tuple(np.asarray(origin, dtype=float) + k * step * normal),
            orientation=orientation,
            index=k,
            **kwargs,  # type: ignore[arg-type]
        )
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
