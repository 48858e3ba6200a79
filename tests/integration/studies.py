"""Test studies for the integration suite: synthetic lumbar studies and deliberately bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.results import StudyResult


def demo_study(out: Path, modality: str = "MR", seed: int = 0) -> tuple[str, list[Path]]:
    """Write a synthetic lumbar study; return its Study Instance UID and its DICOM files."""
    from dicom_io.phantom import write_demo_study

    write_demo_study(out, modality, seed)
    files = dicom_files(out)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return uid, files


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file under ``folder`` (sorted)."""
    out = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix.lower() != ".json":
            with open(f, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                out.append(f)
    return out


def rewrite(files: list[Path], out: Path, edit: Callable[[Dataset], None], salt: str) -> tuple[str, list[Path]]:
    """Copy a study with new UIDs (derived from ``salt``) and ``edit`` applied to every dataset."""
    out.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}

    def new(uid: str) -> str:
        if uid not in mapping:
            mapping[uid] = generate_uid(entropy_srcs=[salt, uid])
        return mapping[uid]

    written = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if kw in ds:
                setattr(ds, kw, new(str(getattr(ds, kw))))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        edit(ds)
        p = out / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        written.append(p)
    return str(pydicom.dcmread(written[0], stop_before_pixels=True).StudyInstanceUID), written


def text_sr_study(out: Path) -> tuple[str, list[Path]]:
    """A study holding only a Basic Text SR: stored by the listener, nothing to analyse."""
    out.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["text-sr"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["text-sr-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["text-sr-series"])
    ds.Modality = "SR"
    ds.PatientID = "TEXT"
    ds.PatientName = "Text^Only"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.ValueType = "CONTAINER"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    p = out / "sr.dcm"
    ds.save_as(p, enforce_file_format=True)
    return str(ds.StudyInstanceUID), [p]


def garbage_file(out: Path) -> Path:
    """A Part-10 file whose file meta is valid and whose dataset is not DICOM at all."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["garbage"])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    p = out / "garbage.dcm"
    ds.save_as(p, enforce_file_format=True)
    raw = bytearray(p.read_bytes())
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    # Replace the dataset with bytes that encode an impossible element length.
    raw[meta_end:] = b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 64
    p.write_bytes(bytes(raw))
    return p


def result_of(outbox: Path, study_uid: str) -> StudyResult:
    """The StudyResult the worker wrote for the latest revision of a study."""
    files = sorted((outbox / study_uid).glob("*/result.json"), key=lambda p: int(p.parent.name))
    assert files, f"no result.json for {study_uid} under {outbox}"
    return StudyResult.from_json(files[-1].read_text())


def discus_objects(orthanc: object, study_uid: str) -> list[dict[str, str]]:
    """Instances of the study in Orthanc that Discus wrote (SR, SC and SEG), by SOP class."""
    return [t for t in orthanc.instances_of(study_uid)  # type: ignore[attr-defined]
            if str(t.get("SOPClassUID", "")).startswith(("1.2.840.10008.5.1.4.1.1.88.",
                                                         "1.2.840.10008.5.1.4.1.1.7",
                                                         "1.2.840.10008.5.1.4.1.1.66.4"))]


def is_sr(tags: dict[str, str]) -> bool:
    return str(tags.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.88.")
