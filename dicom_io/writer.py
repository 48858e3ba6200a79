"""Write voxel arrays with patient geometry as classic single-frame DICOM series.

Used for synthetic studies (:mod:`dicom_io.phantom`) and to turn volumes with an
affine, such as NIfTI files of real anatomy, into DICOM series for tests. Every
UID is derived from a seed string, and dates are fixed, so the same input gives
byte-identical files.

Geometry convention: ``array`` is indexed [slice, row, column] and ``affine``
maps (column, row, slice, 1) to DICOM patient coordinates (LPS, mm), as in
:class:`dicom_io.volume.Volume`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from dicom_io.uids import deterministic_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE_STORAGE_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_SOP_CLASS = {"MR": MR_IMAGE_STORAGE, "CT": CT_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE_PRESENTATION}

#: SNOMED CT view codes (DICOM CID 4010) for the ViewPosition values written.
_VIEW_CODES = {"AP": ("399348003", "antero-posterior"), "PA": ("399196006", "postero-anterior"),
               "LL": ("399173006", "left lateral"), "RL": ("399198007", "right lateral")}

#: Maps RAS+ (NIfTI world) to LPS (DICOM patient) coordinates and back (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class StudyInfo:
    """Patient and study attributes shared by every series of one study.

    The defaults describe a synthetic phantom and say so; ``uid_seed`` derives
    the Study Instance UID and Frame of Reference UID when they are not given.

    Raises
    ------
    ValueError
        If a date is not ``YYYYMMDD`` or a time not ``HHMMSS``.
    """

    uid_seed: str = "discus-phantom"
    patient_name: str = "SYNTHETIC^PHANTOM"
    patient_id: str = "PHANTOM-0"
    patient_birth_date: str = "19700101"
    patient_sex: str = "O"
    study_date: str = "20240101"
    study_time: str = "120000"
    study_id: str = "1"
    accession_number: str = "SYN0"
    study_description: str = "SYNTHETIC LUMBAR SPINE PHANTOM"
    referring_physician: str = ""
    institution: str = "Discus synthetic phantom"
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""

    def __post_init__(self) -> None:
        for name in ("study_date", "patient_birth_date"):
            v = getattr(self, name)
            if not (len(v) == 8 and v.isdigit()):
                raise ValueError(f"{name}: expected YYYYMMDD, got {v!r}")
        if not (len(self.study_time) == 6 and self.study_time.isdigit()):
            raise ValueError(f"study_time: expected HHMMSS, got {self.study_time!r}")
        if not self.study_instance_uid:
            self.study_instance_uid = deterministic_uid(self.uid_seed, "study")
        if not self.frame_of_reference_uid:
            self.frame_of_reference_uid = deterministic_uid(self.uid_seed, "frame-of-reference")


def _ds(v: float) -> DSfloat:
    return DSfloat(float(v), auto_format=True)


def _geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    a = np.asarray(affine, float)
    if a.shape != (4, 4):
        raise ValueError(f"affine: expected 4x4, got {a.shape}")
    col_sp, row_sp = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))
    slice_sp = float(np.linalg.norm(a[:3, 2]))
    if min(col_sp, row_sp) <= 0:
        raise ValueError("affine: zero pixel spacing")
    rdir, cdir = a[:3, 0] / col_sp, a[:3, 1] / row_sp
    if abs(float(rdir @ cdir)) > 1e-4:
        raise ValueError("affine: row and column directions are not orthogonal")
    return rdir, cdir, row_sp, col_sp, slice_sp


def _window(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [1.0, 99.5])
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))


def _patient_orientation(rdir: np.ndarray, cdir: np.ndarray) -> list[str]:
    """PatientOrientation codes (main axis letters) of the row and column directions."""
    def code(v: np.ndarray) -> str:
        letters = [("L", "R"), ("P", "A"), ("H", "F")]
        order = np.argsort(-np.abs(v))
        out = ""
        for i in order:
            if abs(v[i]) > 0.25:
                out += letters[i][0] if v[i] > 0 else letters[i][1]
        return out or "L"
    return [code(rdir), code(cdir)]


def write_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    modality: str = "MR",
    study: StudyInfo | None = None,
    series_description: str = "",
    series_number: int = 1,
    extra: dict | None = None,
    uid_seed: str = "discus-series",
) -> list[Path]:
    """Write ``array`` as one single-frame image per slice into ``out_dir``.

    Parameters
    ----------
    array : numpy.ndarray
        [slice, row, column]; MR and DX values are stored as uint16 (rounded,
        clipped), CT values are Hounsfield units stored as int16 with
        RescaleIntercept -1024. DX takes exactly one slice.
    affine : numpy.ndarray
        4x4, (column, row, slice, 1) -> LPS mm.
    out_dir : Path
        Created if needed; files are named ``0001.dcm``, ``0002.dcm``, ...
    modality : str
        ``MR`` (MR Image Storage), ``CT`` (CT Image Storage) or ``DX`` (Digital
        X-Ray Image Storage - For Presentation).
    study : StudyInfo, optional
        Patient and study attributes; a synthetic default when None.
    series_description, series_number : str, int
        Written as SeriesDescription and SeriesNumber.
    extra : dict, optional
        Further attributes by keyword (e.g. ``RepetitionTime``, ``EchoTime``,
        ``ScanningSequence``, ``SliceThickness``, ``ViewPosition``); they
        override the defaults.
    uid_seed : str
        Seeds the Series and SOP Instance UIDs.

    Returns
    -------
    list of Path
        The files written, in slice order.

    Raises
    ------
    ValueError
        If the modality is unknown, the array is not 3-D, or the geometry is invalid.
    """
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality: {modality!r} is not one of {tuple(_SOP_CLASS)}")
    arr = np.asarray(array)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"array: expected [slice, row, column], got shape {arr.shape}")
    if modality == "DX" and arr.shape[0] != 1:
        raise ValueError(f"array: a DX image has one slice, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("array: contains NaN or infinite values")
    rdir, cdir, row_sp, col_sp, slice_sp = _geometry(affine)
    study = study or StudyInfo()
    extra = dict(extra or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    aff = np.asarray(affine, float)
    normal = np.cross(rdir, cdir)
    series_uid = deterministic_uid(study.study_instance_uid, uid_seed, "series", str(series_number))
    sop_class = _SOP_CLASS[modality]

    if modality == "CT":
        stored = np.clip(np.round(arr + 1024.0), -32768, 32767).astype(np.int16)
    elif modality == "DX":
        stored = np.clip(np.round(arr), 0, 4095).astype(np.uint16)
    else:
        stored = np.clip(np.round(arr), 0, 65535).astype(np.uint16)
    centre, width = _window(arr)
    if modality == "CT":
        centre, width = float(extra.pop("WindowCenter", 50.0)), float(extra.pop("WindowWidth", 400.0))

    # One template; only the per-slice attributes change in the loop below.
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "DISCUS_010"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = study.study_time
    # Patient and study
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom: no patient data"
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.study_description
    # Series and equipment
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    ds.ProtocolName = series_description
    ds.BodyPartExamined = "LSPINE"
    ds.Manufacturer = "Discus"
    ds.ManufacturerModelName = "Synthetic phantom"
    ds.InstitutionName = study.institution
    ds.SoftwareVersions = "discus-phantom"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # Image
    ds.AcquisitionNumber = 1
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = study.study_time
    ds.ImageType = ["DERIVED", "PRIMARY"] if modality == "DX" else ["ORIGINAL", "PRIMARY", "AXIAL"
                                                                       if modality == "CT" else "OTHER"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if modality == "DX" else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if modality == "CT" else 0
    ds.WindowCenter = _ds(centre)
    ds.WindowWidth = _ds(width)
    if modality == "DX":
        _dx_attributes(ds, rdir, cdir, row_sp, col_sp)
    else:
        ds.ImageOrientationPatient = [_ds(v) for v in (*rdir, *cdir)]
        ds.PixelSpacing = [_ds(row_sp), _ds(col_sp)]
        ds.SliceThickness = _ds(extra.get("SliceThickness", slice_sp))
        ds.SpacingBetweenSlices = _ds(slice_sp)
        ds.PatientPosition = "HFS"
    if modality == "MR":
        _mr_defaults(ds)
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.ConvolutionKernel = "STANDARD"
    for key, value in extra.items():
        if key == "SliceThickness" and modality == "DX":
            continue
        setattr(ds, key, value)
    if modality == "DX" and ds.ViewPosition in _VIEW_CODES:
        view = Dataset()
        view.CodeValue, view.CodeMeaning = _VIEW_CODES[ds.ViewPosition]
        view.CodingSchemeDesignator = "SCT"
        ds.ViewCodeSequence = [view]
    paths: list[Path] = []
    for k in range(arr.shape[0]):
        sop_uid = deterministic_uid(series_uid, "instance", str(k))
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        if modality != "DX":
            ipp = aff[:3, :3] @ np.array([0.0, 0.0, float(k)]) + aff[:3, 3]
            ds.ImagePositionPatient = [_ds(v) for v in ipp]
            ds.SliceLocation = _ds(float(ipp @ normal))
        ds.PixelData = stored[k].tobytes()
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _mr_defaults(ds: Dataset) -> None:
    """MR Image module attributes a sequence description does not override."""
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = _ds(4000.0)
    ds.EchoTime = _ds(100.0)
    ds.EchoTrainLength = 1
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds(1.5)
    ds.NumberOfAverages = _ds(1.0)


def _dx_attributes(ds: Dataset, rdir: np.ndarray, cdir: np.ndarray, row_sp: float, col_sp: float) -> None:
    """DX Series, DX Image, DX Detector and DX Positioning attributes (for presentation)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ImagerPixelSpacing = [_ds(row_sp), _ds(col_sp)]
    ds.PixelSpacing = [_ds(row_sp), _ds(col_sp)]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Synthetic projection, no magnification"
    ds.DetectorType = "DIRECT"
    ds.PatientOrientation = _patient_orientation(rdir, cdir)
    ds.ImageLaterality = "U"
    ds.KVP = 85
    ds.DistanceSourceToDetector = _ds(1150.0)
    ds.DistanceSourceToPatient = _ds(1000.0)
    ds.Exposure = 40
    ds.PositionerType = "NONE"
    ds.ViewPosition = "AP"
    region = Dataset()
    region.CodeValue = "122496007"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Lumbar spine"
    ds.AnatomicRegionSequence = [region]
    ds.AcquisitionContextSequence = []


def nifti_to_lps(nifti_path: Path, slice_thickness: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI volume as a sagittal stack in DICOM patient coordinates.

    The slice axis is the array axis closest to patient left-right; rows run
    head to foot and columns anterior to posterior, like a clinical sagittal
    series. The affine is kept exact (RAS -> LPS with :data:`RAS_TO_LPS`). With
    ``slice_thickness``, consecutive slices are averaged into slabs of about that
    thickness, each slab centred on the mean position of its slices.

    Returns
    -------
    (array, affine)
        float32 [slice, row, column] and its 4x4 (column, row, slice, 1) -> LPS affine.

    Raises
    ------
    ValueError
        If the volume is not 3-D or ``slice_thickness`` is not positive.
    """
    import nibabel as nib

    img = nib.load(str(nifti_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"nifti_path: expected a 3-D volume, got shape {data.shape}")
    aff = RAS_TO_LPS @ np.asarray(img.affine, float)  # (i, j, k, 1) -> LPS
    dirs = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    # Slice axis: closest to left-right; row direction (column index) closest to
    # anterior-posterior; column direction (row index) closest to head-foot.
    slice_ax = int(np.argmax(np.abs(dirs[0])))
    rest = [a for a in range(3) if a != slice_ax]
    ap_ax = max(rest, key=lambda a: abs(dirs[1, a]))
    si_ax = [a for a in rest if a != ap_ax][0]
    vol = np.transpose(data, (slice_ax, si_ax, ap_ax))  # [slice, row, column]
    new = np.eye(4)
    new[:3, :3] = aff[:3, [ap_ax, si_ax, slice_ax]]
    new[:3, 3] = aff[:3, 3]
    # Flip so columns run posterior, rows run inferior; then order slices along the normal.
    if new[1, 0] < 0:
        new[:3, 3] += new[:3, 0] * (vol.shape[2] - 1)
        new[:3, 0] *= -1
        vol = vol[:, :, ::-1]
    if new[2, 1] > 0:
        new[:3, 3] += new[:3, 1] * (vol.shape[1] - 1)
        new[:3, 1] *= -1
        vol = vol[:, ::-1, :]
    normal = np.cross(new[:3, 0], new[:3, 1])
    if float(new[:3, 2] @ normal) < 0:
        new[:3, 3] += new[:3, 2] * (vol.shape[0] - 1)
        new[:3, 2] *= -1
        vol = vol[::-1]
    if slice_thickness is not None:
        if slice_thickness <= 0:
            raise ValueError(f"slice_thickness: must be positive, got {slice_thickness!r}")
        step = float(np.linalg.norm(new[:3, 2]))
        n = max(int(round(slice_thickness / step)), 1)
        m = vol.shape[0] // n
        if m >= 1 and n > 1:
            vol = vol[: m * n].reshape(m, n, *vol.shape[1:]).mean(axis=1)
            new[:3, 3] += new[:3, 2] * (n - 1) / 2.0
            new[:3, 2] *= n
    return np.ascontiguousarray(vol, dtype=np.float32), new


def write_nifti_as_series(nifti_path: Path, out_dir: Path, *, slice_thickness: float | None = None,
                          **kw: Any) -> list[Path]:
    """Write a NIfTI volume (RAS affine) as a sagittal DICOM MR series.

    See :func:`nifti_to_lps` for the geometry; the remaining keywords go to
    :func:`write_series` (``study``, ``series_description``, ``uid_seed``, ...).
    Map NIfTI world points (RAS mm) into the series with :data:`RAS_TO_LPS`.
    """
    vol, aff = nifti_to_lps(nifti_path, slice_thickness)
    kw.setdefault("series_description", "SAG T2 " + Path(nifti_path).name.split(".")[0])
    kw.setdefault("uid_seed", "nifti:" + Path(nifti_path).name)
    extra = dict(kw.pop("extra", None) or {})
    if slice_thickness is not None:
        extra.setdefault("SliceThickness", float(np.linalg.norm(aff[:3, 2])))
    return write_series(vol, aff, out_dir, modality="MR", extra=extra, **kw)
