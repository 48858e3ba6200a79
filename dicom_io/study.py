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


@dataclass
class Study:
    study_instance_uid: str
    patient_id: str = ""
    accession_number: str = ""
    study_description: str = ""
    series: list[Series] = field(default_factory=list)
    folder: Path | None = None
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
