"""The contracts between analysis and output: levels, findings and the study result.

These are plain typed dataclasses (numpy only, no pydicom, no torch) so that the
pipeline can produce them and the SR/SC encoders can consume them without either
side knowing the other. A :class:`StudyResult` is everything the SR and the SC
images are encoded from, together with the source datasets it references.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Level names, cranial to caudal. Vertebrae T10 ... L5, S1; discs between neighbours.
VERTEBRAE: tuple[str, ...] = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
DISCS: tuple[str, ...] = tuple(f"{a}-{b}" for a, b in zip(VERTEBRAE[:-1], VERTEBRAE[1:]))
LEVELS: tuple[str, ...] = VERTEBRAE + DISCS
#: Finding site used for whole-image findings (X-ray), where no single level applies.
LUMBAR_SPINE = "lumbar spine"


class ConditionValues(str, enum.Enum):
    """Conditions the product reports. Values are stable identifiers used in JSON and codes."""

    DISC = "disc"  # normal / bulging / herniation (MR axial, CT axial)
    SPINAL_CANAL_STENOSIS = "spinal_canal_stenosis"
    NEURAL_FORAMINAL_NARROWING = "neural_foraminal_narrowing"  # with laterality
    SUBARTICULAR_STENOSIS = "subarticular_stenosis"  # with laterality
    SPINE_XRAY = "spine_xray"  # normal / scoliosis / spondylolisthesis (whole image)
    # Disc grading on the sagittal image (per disc level):
    PFIRRMANN = "pfirrmann"  # Pfirrmann grade 1-5 of disc degeneration
    DISC_NARROWING = "disc_narrowing"  # absent / present
    SPONDYLOLISTHESIS = "spondylolisthesis"  # absent / present (slip at the disc level)
    MODIC = "modic_change"  # absent / present (any Modic type)
    UPPER_ENDPLATE = "upper_endplate_defect"  # absent / present (endplate change or Schmorl node)
    LOWER_ENDPLATE = "lower_endplate_defect"  # absent / present


class LateralityValues(str, enum.Enum):
    LEFT = "L"
    RIGHT = "R"


#: Grades per condition, in increasing severity. The first grade is "no finding".
GRADES: dict[ConditionValues, tuple[str, ...]] = {
    ConditionValues.DISC: ("normal", "bulging", "herniation"),
    ConditionValues.SPINAL_CANAL_STENOSIS: ("normal_mild", "moderate", "severe"),
    ConditionValues.NEURAL_FORAMINAL_NARROWING: ("normal_mild", "moderate", "severe"),
    ConditionValues.SUBARTICULAR_STENOSIS: ("normal_mild", "moderate", "severe"),
    ConditionValues.SPINE_XRAY: ("normal", "scoliosis", "spondylolisthesis"),
    ConditionValues.PFIRRMANN: ("pfirrmann_1", "pfirrmann_2", "pfirrmann_3", "pfirrmann_4", "pfirrmann_5"),
    ConditionValues.DISC_NARROWING: ("absent", "present"),
    ConditionValues.SPONDYLOLISTHESIS: ("absent", "present"),
    ConditionValues.MODIC: ("absent", "present"),
    ConditionValues.UPPER_ENDPLATE: ("absent", "present"),
    ConditionValues.LOWER_ENDPLATE: ("absent", "present"),
}

#: Conditions that are reported per side.
LATERALIZED = frozenset(
    {ConditionValues.NEURAL_FORAMINAL_NARROWING, ConditionValues.SUBARTICULAR_STENOSIS}
)


class SeriesRoleValues(str, enum.Enum):
    """Role a series plays in the analysis (DESIGN.md)."""

    SAG_T2 = "SAG_T2"
    SAG_T1 = "SAG_T1"
    SAG_STIR = "SAG_STIR"
    AX_T2 = "AX_T2"
    CT_AXIAL = "CT_AXIAL"
    XRAY_AP = "XRAY_AP"
    XRAY_LAT = "XRAY_LAT"
    OTHER = "OTHER"


class StatusValues(str, enum.Enum):
    ANALYSED = "analysed"
    NOT_PERFORMED = "not_performed"


@dataclass(frozen=True)
class ImageRef:
    """A point on one source image: the image the finding or level was read on.

    ``row`` and ``column`` are 0-based pixel coordinates (float, pixel centres at
    integers), ``frame`` is the 1-based frame number (1 for single-frame images).
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    row: float
    column: float
    frame: int = 1


@dataclass
class LevelLocation:
    """A vertebra (``L4``) or disc (``L4-L5``) located on the study."""

    level: str
    point_mm: tuple[float, float, float]
    image: ImageRef
    confidence: float

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level: unknown level {self.level!r}; known: {', '.join(LEVELS)}")
        if not 0.0 <= float(self.confidence) <= 1.0:
            raise ValueError(f"confidence: must be in [0, 1], got {self.confidence!r}")


@dataclass
class ModelInfo:
    """Provenance of one model package (goes into the SR's algorithm identification)."""

    name: str
    version: str
    task: str
    sha256: str
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class Finding:
    """One graded condition at one level (or the whole lumbar spine for X-ray).

    ``heatmap`` is a float32 array in the pixels of the source image ``image``
    refers to (shape = that image's Rows x Columns), normalised to [0, 1].
    """

    level: str
    condition: ConditionValues
    grade: str
    probabilities: dict[str, float]
    model: str
    model_version: str
    image: ImageRef
    laterality: LateralityValues | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)
    calibrated: bool = False  # probabilities temperature-scaled on out-of-fold predictions

    def __post_init__(self) -> None:
        self.condition = ConditionValues(self.condition)
        if self.laterality is not None:
            self.laterality = LateralityValues(self.laterality)
        if self.level != LUMBAR_SPINE and self.level not in LEVELS:
            raise ValueError(f"level: unknown level {self.level!r}")
        grades = GRADES[self.condition]
        if self.grade not in grades:
            raise ValueError(
                f"grade: {self.grade!r} is not a grade of {self.condition.value}; known: {grades}"
            )
        if (self.condition in LATERALIZED) != (self.laterality is not None):
            raise ValueError(
                f"laterality: {self.condition.value} requires laterality"
                if self.condition in LATERALIZED
                else f"laterality: {self.condition.value} takes no laterality"
            )

    @property
    def probability(self) -> float:
        """Probability of the reported grade."""
        return float(self.probabilities[self.grade])

    @property
    def severity(self) -> int:
        """Index of the grade in :data:`GRADES` (0 = no finding)."""
        return GRADES[self.condition].index(self.grade)


#: Level of a measurement spanning the lumbar spine (lordosis).
LORDOSIS_LEVEL = "L1-S1"


def _check_measurement_level(level: str) -> None:
    if level != LORDOSIS_LEVEL and level not in LEVELS and level not in ("T9", "T9-T10"):
        raise ValueError(f"level: unknown level {level!r}")


@dataclass
class SpineMeasurement:
    """One number measured at one level on one source image (a height, a slip, a diameter, an angle).

    ``unit`` is a UCUM code (``mm``, ``%``, ``deg``, ``1``); ``points`` are ``(row, column)``
    pixels of the source image ``image`` refers to, in pairs, each pair a segment the value was
    measured along (empty for ratios derived from other measurements).
    """

    level: str
    name: str
    value: float
    unit: str
    image: ImageRef
    points: tuple[tuple[float, float], ...] = ()
    basis: str = ""
    model: str = ""
    model_version: str = ""
    #: Outline ``(row, column)`` of the structure measured (closed: the first point repeated last),
    #: or the measured segments where there is no single structure (lordosis).
    region: tuple[tuple[float, float], ...] = ()
    #: The package's cross-validated mean absolute error for this measurement, in ``unit`` (None: unknown).
    uncertainty: float | None = None

    def __post_init__(self) -> None:
        _check_measurement_level(self.level)
        self.region = tuple((float(r), float(c)) for r, c in self.region)
        if not self.name or not self.unit:
            raise ValueError("name, unit: required")
        if not np.isfinite(float(self.value)):
            raise ValueError(f"value: must be finite, got {self.value!r}")
        self.value = float(self.value)
        self.points = tuple((float(r), float(c)) for r, c in self.points)
        if len(self.points) % 2:
            raise ValueError("points: segments of two (row, column) points expected")


@dataclass
class MeasurementCategory:
    """A grade derived from measurements by a published rule (Genant, Meyerding, canal stenosis)."""

    level: str
    name: str
    value: str
    basis: str
    image: ImageRef
    model: str = ""
    model_version: str = ""

    def __post_init__(self) -> None:
        _check_measurement_level(self.level)
        if not self.name or not self.value:
            raise ValueError("name, value: required")


@dataclass
class SegmentationMasks:
    """Label masks of some source images: SOP Instance UID -> ``[rows, columns]`` integer mask.

    ``labels`` names each label value (``"L4"``, ``"L4-L5"``, ``"canal"``); value 0 is background.
    """

    series_instance_uid: str
    masks: dict[str, np.ndarray]
    labels: dict[int, str]
    model: str = ""
    model_version: str = ""


@dataclass
class SeriesUse:
    """A series of the study and the role the selection rules gave it, with the reason."""

    series_instance_uid: str
    role: SeriesRoleValues
    reason: str
    description: str = ""
    modality: str = ""

    def __post_init__(self) -> None:
        self.role = SeriesRoleValues(self.role)


@dataclass
class StudyResult:
    """Everything the SR and SC objects are encoded from."""

    study_instance_uid: str
    revision: int
    status: StatusValues = StatusValues.ANALYSED
    reason: str | None = None
    modality: str = "MR"
    series: list[SeriesUse] = field(default_factory=list)
    levels: list[LevelLocation] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    models: list[ModelInfo] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # analysis -> why it was not run
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    measurements: list[SpineMeasurement] = field(default_factory=list)
    categories: list[MeasurementCategory] = field(default_factory=list)
    #: Draft report text (AI-generated, for the radiologist to accept or edit); empty when none.
    draft_report: str = ""
    #: Masks for a DICOM Segmentation object (not in the JSON; they travel as the SEG).
    segmentation: SegmentationMasks | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.status = StatusValues(self.status)
        if self.revision < 1:
            raise ValueError(f"revision: must be >= 1, got {self.revision!r}")
        if self.status is StatusValues.NOT_PERFORMED and not self.reason:
            raise ValueError("reason: required when status is not_performed")

    def to_json(self) -> str:
        """JSON without heatmaps (they travel as DICOM SC images, not as JSON)."""

        def default(o: Any) -> Any:
            if isinstance(o, enum.Enum):
                return o.value
            if isinstance(o, np.ndarray):
                return None
            if isinstance(o, (np.floating, np.integer)):
                return o.item()
            raise TypeError(f"not JSON serialisable: {type(o).__name__}")

        data = asdict(self)
        data.pop("segmentation", None)
        for f in data["findings"]:
            f.pop("heatmap", None)
        return json.dumps(data, default=default, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudyResult:
        d = json.loads(text)
        d["series"] = [SeriesUse(**s) for s in d["series"]]
        d["levels"] = [
            LevelLocation(
                level=lv["level"],
                point_mm=tuple(lv["point_mm"]),
                image=ImageRef(**lv["image"]),
                confidence=lv["confidence"],
            )
            for lv in d["levels"]
        ]
        d["findings"] = [
            Finding(**{**f, "image": ImageRef(**f["image"])}) for f in d["findings"]
        ]
        d["models"] = [ModelInfo(**m) for m in d["models"]]
        d["measurements"] = [SpineMeasurement(**{**m, "image": ImageRef(**m["image"]),
                                                 "points": [tuple(p) for p in m["points"]],
                                                 "region": [tuple(p) for p in m.get("region", [])]})
                             for m in d.get("measurements", [])]
        d["categories"] = [MeasurementCategory(**{**c, "image": ImageRef(**c["image"])})
                           for c in d.get("categories", [])]
        return cls(**d)
