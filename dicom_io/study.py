"""Study / Series / Instance, built from DICOM headers only (no pixel data).

These are the contracts the pipeline selects series from. Builders that read a
spool folder live beside them (``Study.from_folder``); they never decode pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dicom_io.results import SeriesRoleValues


@dataclass
class Instance:
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    instance_number: int | None = None
    image_position: tuple[float, float, float] | None = None  # ImagePositionPatient
    image_orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6 values)
    pixel_spacing: tuple[float, float] | None = None  # (row spacing, column spacing) mm
    slice_thickness: float | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int = 1
    transfer_syntax_uid: str = ""
    image_type: tuple[str, ...] = ()  # ImageType values, e.g. ("ORIGINAL", "PRIMARY", "LOCALIZER")
    view_position: str = ""  # ViewPosition (projection radiography), e.g. "AP", "LL"


@dataclass
class Series:
    series_instance_uid: str
    modality: str
    description: str = ""
    body_part: str = ""
    sequence_name: str = ""  # SequenceName / ScanningSequence, for rules
    repetition_time: float | None = None
    echo_time: float | None = None
    frame_of_reference_uid: str | None = None
    instances: list[Instance] = field(default_factory=list)
    role: SeriesRoleValues = SeriesRoleValues.OTHER
    role_reason: str = "not yet classified"
    series_number: int | None = None
    protocol_name: str = ""
    scanning_sequence: str = ""  # ScanningSequence, e.g. "SE", "IR", "GR"
    inversion_time: float | None = None  # InversionTime, ms
    image_type: tuple[str, ...] = ()  # ImageType of the first instance
    view_position: str = ""  # ViewPosition of the first instance (DX, CR)


@dataclass
class Study:
    study_instance_uid: str
    patient_id: str = ""
    accession_number: str = ""
    study_description: str = ""
    series: list[Series] = field(default_factory=list)
    folder: Path | None = None
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    # distinct (PatientID, PatientName) pairs among the study's instances; more than one is unsafe
    patient_identities: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def from_folder(cls, folder: Path | str) -> Study:
        """Build a study from the headers of the files under ``folder`` (see ``dicom_io.headers``)."""
        from dicom_io.headers import load_study

        return load_study(folder)
