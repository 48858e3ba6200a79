"""Build :class:`~dicom_io.study.Study` / ``Series`` / ``Instance`` from DICOM headers only.

Pixel data are never read here. A file that cannot be parsed, lacks the UIDs
that place it, or belongs to another study is recorded in
``Study.unreadable`` with the reason, never raised, so one bad file does not
stop the analysis of the others.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_io.study import Instance, Series, Study

LOGGER = logging.getLogger(__name__)

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Files that are never DICOM (ground truth, notes, exports beside a study): skipped, not "unreadable".
_NOT_DICOM_SUFFIXES = frozenset({".json", ".txt", ".md", ".csv", ".xml", ".nii", ".gz", ".png", ".jpg", ".jpeg"})


def _float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` floats from a multi-valued attribute, or None when absent or malformed."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _strings(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\"))
    return tuple(str(v).strip().upper() for v in value)


def _first_item(ds: Dataset, *path: str) -> Dataset | None:
    """The first item reached through nested sequences named in ``path``, or None."""
    node: Any = ds
    for keyword in path:
        seq = node.get(keyword) if node is not None else None
        if not seq:
            return None
        node = seq[0]
    return node


def frame_geometry(ds: Dataset, frame: int = 0) -> dict[str, Any]:
    """Position, orientation, spacing and thickness of one frame (0-based).

    Reads the top-level attributes of single-frame images and, for enhanced
    multi-frame images, the per-frame then shared functional groups.

    Returns
    -------
    dict
        Keys ``position`` (3 floats), ``orientation`` (6), ``spacing`` (2:
        row, column), ``thickness`` (float); each may be ``None``.
    """
    out: dict[str, Any] = {
        "position": _floats(ds.get("ImagePositionPatient"), 3),
        "orientation": _floats(ds.get("ImageOrientationPatient"), 6),
        "spacing": _floats(ds.get("PixelSpacing"), 2),
        "thickness": _float(ds.get("SliceThickness")),
    }
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = []
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    if shared is not None:
        groups.append(shared)
    for group in groups:  # per-frame values take precedence over shared ones
        if out["position"] is None:
            item = _first_item(group, "PlanePositionSequence")
            out["position"] = _floats(item.get("ImagePositionPatient"), 3) if item else None
        if out["orientation"] is None:
            item = _first_item(group, "PlaneOrientationSequence")
            out["orientation"] = _floats(item.get("ImageOrientationPatient"), 6) if item else None
        item = _first_item(group, "PixelMeasuresSequence")
        if item is not None:
            if out["spacing"] is None:
                out["spacing"] = _floats(item.get("PixelSpacing"), 2)
            if out["thickness"] is None:
                out["thickness"] = _float(item.get("SliceThickness"))
    return out


def _sequence_parameters(ds: Dataset) -> dict[str, Any]:
    """TR, TE, TI, scanning sequence, read from top level or enhanced MR functional groups."""
    tr = _float(ds.get("RepetitionTime"))
    te = _float(ds.get("EchoTime"))
    ti = _float(ds.get("InversionTime"))
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    frame = _first_item(ds, "PerFrameFunctionalGroupsSequence")
    for group in (g for g in (frame, shared) if g is not None):
        timing = _first_item(group, "MRTimingAndRelatedParametersSequence")
        if tr is None and timing is not None:
            tr = _float(timing.get("RepetitionTime"))
        echo = _first_item(group, "MREchoSequence")
        if te is None and echo is not None:
            te = _float(echo.get("EffectiveEchoTime"))
        modifier = _first_item(group, "MRModifierSequence")
        if ti is None and modifier is not None:
            times = modifier.get("InversionTimes")
            ti = _float(times[0]) if times else None
    scanning = _text(ds.get("ScanningSequence"))
    if not scanning:
        # Enhanced MR: EchoPulseSequence SPIN/GRADIENT/BOTH, InversionRecovery YES/NO.
        parts = {"SPIN": "SE", "GRADIENT": "GR", "BOTH": "SE\\GR"}.get(_text(ds.get("EchoPulseSequence")), "")
        if _text(ds.get("InversionRecovery")).upper() == "YES":
            parts = "\\".join(p for p in (parts, "IR") if p)
        scanning = parts
    return {"tr": tr, "te": te, "ti": ti, "scanning": scanning}


def read_header(path: Path) -> Dataset:
    """Read a file's header without pixel data.

    Raises
    ------
    Exception
        Whatever pydicom raises for an unparsable file.
    """
    return dcmread(path, stop_before_pixels=True)


def _instance(ds: Dataset, path: Path) -> Instance:
    geometry = frame_geometry(ds, 0)
    meta = getattr(ds, "file_meta", None)
    return Instance(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        path=path,
        instance_number=_int(ds.get("InstanceNumber")),
        image_position=geometry["position"],
        image_orientation=geometry["orientation"],
        pixel_spacing=geometry["spacing"],
        slice_thickness=geometry["thickness"],
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        number_of_frames=_int(ds.get("NumberOfFrames")) or 1,
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
        image_type=_strings(ds.get("ImageType")),
        view_position=_text(ds.get("ViewPosition")).upper(),
    )


def _series(ds: Dataset) -> Series:
    params = _sequence_parameters(ds)
    return Series(
        series_instance_uid=str(ds.SeriesInstanceUID),
        modality=_text(ds.get("Modality")).upper(),
        description=_text(ds.get("SeriesDescription")),
        body_part=_text(ds.get("BodyPartExamined")).upper(),
        sequence_name=_text(ds.get("SequenceName")) or _text(ds.get("PulseSequenceName")),
        repetition_time=params["tr"],
        echo_time=params["te"],
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")) or None,
        series_number=_int(ds.get("SeriesNumber")),
        protocol_name=_text(ds.get("ProtocolName")),
        scanning_sequence=params["scanning"],
        inversion_time=params["ti"],
        image_type=_strings(ds.get("ImageType")),
        view_position=_text(ds.get("ViewPosition")).upper(),
    )


def _files(folder: Path) -> Iterable[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):  # the spool's temporary files are hidden
                continue
            if os.path.splitext(name)[1].lower() not in _NOT_DICOM_SUFFIXES:
                yield Path(root) / name


def load_study(folder: str | os.PathLike[str], study_instance_uid: str | None = None) -> Study:
    """Build a :class:`Study` from the headers of every file under ``folder``.

    Parameters
    ----------
    folder : path
        A study folder (e.g. ``<spool>/<StudyInstanceUID>``), searched recursively.
    study_instance_uid : str, optional
        The study to keep; by default the study most files belong to. Files
        of other studies are recorded as unreadable with that reason.

    Returns
    -------
    Study
        Series sorted by SeriesNumber then UID, instances by InstanceNumber
        then UID; ``unreadable`` lists ``(path, reason)`` for skipped files.

    Raises
    ------
    TypeError
        If ``folder`` is not a path.
    FileNotFoundError
        If ``folder`` is not a directory.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder: expected a path, got {type(folder).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: not a directory: {folder}")
    unreadable: list[tuple[Path, str]] = []
    headers: list[tuple[Path, Dataset]] = []
    for path in _files(folder):
        try:
            ds = read_header(path)
        except Exception as exc:  # pydicom raises many types on bad files
            unreadable.append((path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"))
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID") == _DICOMDIR_CLASS:
            continue  # a media directory, not an instance
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not ds.get(k)]
        if missing:
            unreadable.append((path, f"missing {', '.join(missing)}"))
            continue
        headers.append((path, ds))

    if study_instance_uid is None and headers:
        study_instance_uid = Counter(str(ds.StudyInstanceUID) for _, ds in headers).most_common(1)[0][0]
    first = next((ds for _, ds in headers if ds.StudyInstanceUID == study_instance_uid), None)
    study = Study(
        study_instance_uid=study_instance_uid or "",
        patient_id=_text(first.get("PatientID")) if first is not None else "",
        accession_number=_text(first.get("AccessionNumber")) if first is not None else "",
        study_description=_text(first.get("StudyDescription")) if first is not None else "",
        folder=folder,
        unreadable=unreadable,
    )
    by_uid: dict[str, Series] = {}
    seen: set[str] = set()
    for path, ds in headers:
        if ds.StudyInstanceUID != study_instance_uid:
            unreadable.append((path, f"belongs to another study {ds.StudyInstanceUID}"))
            continue
        if ds.SOPInstanceUID in seen:
            unreadable.append((path, f"second copy of SOP Instance {ds.SOPInstanceUID}"))
            continue
        seen.add(str(ds.SOPInstanceUID))
        study.patient_identities.add((_text(ds.get("PatientID")), _text(ds.get("PatientName"))))
        series = by_uid.get(ds.SeriesInstanceUID)
        if series is None:
            series = by_uid[ds.SeriesInstanceUID] = _series(ds)
        series.instances.append(_instance(ds, path))
    for series in by_uid.values():
        series.instances.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0, i.sop_instance_uid))
    study.series = sorted(
        by_uid.values(),
        key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid),
    )
    LOGGER.debug(
        "study %s: %d series, %d instances, %d unreadable",
        study.study_instance_uid,
        len(study.series),
        len(seen),
        len(unreadable),
    )
    return study


#: SOP classes of the objects Discus writes (the SR and the Secondary Capture images).
OUTPUT_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7",
                                "1.2.840.10008.5.1.4.1.1.66.4"})  # SR, SC, SEG
#: Purpose of Reference of Discus's Contributing Equipment item (DCM 109102 "Processing Equipment").
_PROCESSING_EQUIPMENT = "109102"


def is_own_output(path: str | Path, sop_class_uid: str, manufacturer: str = "Discus") -> bool:
    """Whether a stored object is one Discus wrote (an SR, SC or SEG whose processing equipment is ours).

    A PACS that routes whole studies sends Discus's results back with the images;
    analysing them as new instances would make a new revision, whose results would
    come back again. Only SR, SC and SEG objects are read (their header, no pixels).
    """
    if sop_class_uid not in OUTPUT_SOP_CLASSES:
        return False
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["ContributingEquipmentSequence"])
    except Exception:  # an unreadable object is not ours; the pipeline reports it
        return False
    for item in ds.get("ContributingEquipmentSequence", []):
        purposes = {str(c.get("CodeValue", "")) for c in item.get("PurposeOfReferenceCodeSequence", [])}
        if item.get("Manufacturer") == manufacturer and _PROCESSING_EQUIPMENT in purposes:
            return True
    return False


#: Type 2 attributes of the patient and study modules that results copy from their sources,
#: with their value representation and largest length (PS3.5 6.2; PN per component group).
_COPIED_TYPE2: dict[str, tuple[str, int]] = {
    "PatientName": ("PN", 64), "PatientID": ("LO", 64), "PatientBirthDate": ("DA", 8),
    "PatientSex": ("CS", 16), "StudyDate": ("DA", 8), "StudyTime": ("TM", 16),
    "ReferringPhysicianName": ("PN", 64), "StudyID": ("SH", 16), "AccessionNumber": ("SH", 16),
}


def _valid_value(vr: str, value: str, max_len: int) -> bool:
    import datetime
    import re

    if vr == "DA":
        try:
            datetime.datetime.strptime(value, "%Y%m%d")
        except ValueError:
            return False
        return len(value) == 8
    if vr == "TM":
        m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", value)
        return bool(m) and int(m.group(1)) < 24 and int(m.group(2) or 0) < 60 and int(m.group(3) or 0) < 60
    if vr == "CS" and value not in ("M", "F", "O"):  # PatientSex: the only CS here
        return False
    if vr == "PN":
        return all(len(group) <= max_len for group in value.split("="))
    return len(value) <= max_len and "\\" not in value


def repair_header(ds: Dataset) -> list[str]:
    """Make the patient and study attributes that results copy valid, in place; returns what was changed.

    Scanners and PACS send headers without some type 2 attributes, or with values
    their VR does not allow (``PatientSex`` "ZZZ", ``StudyDate`` "20241345", a
    64+ character ID). The results copy these attributes and must stay valid: a
    missing one is added empty (type 2: present, empty), a malformed one is
    emptied, never guessed at. The returned names are attribute keywords only,
    never values, so they can go into a log or a reason.
    """
    changed = []
    for keyword, (vr, max_len) in _COPIED_TYPE2.items():
        if keyword not in ds:
            setattr(ds, keyword, "")
            changed.append(f"{keyword} (missing)")
            continue
        raw = ds[keyword].value
        text = "" if raw is None else str(raw).strip()
        if keyword == "PatientSex" and text.upper() in ("M", "F", "O") and text != text.upper():
            ds.PatientSex = text.upper()
            changed.append(f"{keyword} (upper-cased)")
            continue
        if text and not _valid_value(vr, text, max_len):
            setattr(ds, keyword, "")
            changed.append(f"{keyword} (invalid)")
    return changed
