"""Declarative series selection: which series plays which role, and why.

Each series is described by features read from its headers (modality,
orientation from ImageOrientationPatient, weighting from the description or
from the sequence parameters, view position, body part, localizer flags). A
few exclusions apply first (not an image, localizer, not the spine); then the
first :class:`SeriesRule` whose conditions all hold gives the role. Every
series gets a reason saying what was seen and which rule decided, and a failed
:func:`select_series` lists every candidate with its reason.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dicom_io.errors import SeriesSelectionError
from dicom_io.results import SeriesRoleValues, SeriesUse
from dicom_io.study import Series, Study


class OrientationValues(str, enum.Enum):
    """Plane of an image, by the dominant axis of its normal (patient LPS)."""

    SAGITTAL = "sagittal"  # normal mostly along x (left-right)
    CORONAL = "coronal"  # normal mostly along y (anterior-posterior)
    AXIAL = "axial"  # normal mostly along z (head-foot)
    UNKNOWN = "unknown"  # no or malformed ImageOrientationPatient


class WeightingValues(str, enum.Enum):
    T1 = "T1"
    T2 = "T2"
    STIR = "STIR"
    UNKNOWN = "unknown"


class ViewValues(str, enum.Enum):
    """Projection of a radiograph."""

    FRONTAL = "frontal"  # AP or PA
    LATERAL = "lateral"
    UNKNOWN = "unknown"


def orientation_of(image_orientation: Sequence[float] | None) -> OrientationValues:
    """The plane of an ImageOrientationPatient, by the dominant axis of the normal."""
    if image_orientation is None or len(image_orientation) != 6:
        return OrientationValues.UNKNOWN
    o = np.asarray(image_orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    if not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 1e-3:
        return OrientationValues.UNKNOWN
    return (OrientationValues.SAGITTAL, OrientationValues.CORONAL, OrientationValues.AXIAL)[
        int(np.argmax(np.abs(normal)))
    ]


def _word(token: str) -> re.Pattern[str]:
    # "T2" as a token: not inside "T12" or "ST2X"; "_" and "-" count as separators.
    return re.compile(rf"(?<![a-z0-9]){token}(?![0-9])", re.IGNORECASE)


_STIR_RE = re.compile(r"stir|tirm|\bt2[ _-]?ir\b", re.IGNORECASE)
_T2_RE = _word("t2")
_T1_RE = _word("t1")
_LOCALIZER_RE = re.compile(
    r"loc(aliser|alizer|\b)|scout|survey|pilot|3[ -]?plane|topogram|scanogram|calibration|\bcal\b",
    re.IGNORECASE,
)
_NOT_SPINE_RE = re.compile(
    r"head|brain|skull|neck|c[ -]?spine|cervical|chest|thorax|knee|shoulder|hip\b|hand|foot|ankle"
    r"|elbow|wrist|breast|heart|cardiac|abdomen|pelvis|orbit|sinus",
    re.IGNORECASE,
)
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
_FRONTAL_VIEWS = frozenset({"AP", "PA"})


def weighting_of(series: Series) -> tuple[WeightingValues, str]:
    """The contrast weighting of an MR series, with how it was found.

    The description (SeriesDescription, ProtocolName, SequenceName) decides
    when it names exactly one weighting; otherwise the sequence parameters do:
    inversion recovery with a short inversion time (80-300 ms) is STIR, TR <=
    1000 ms with TE <= 30 ms is T1, TR >= 1500 ms with TE >= 60 ms is T2.
    """
    text = " ".join(dict.fromkeys(t for t in (series.description, series.protocol_name, series.sequence_name) if t))
    if _STIR_RE.search(text):
        return WeightingValues.STIR, f"'STIR' in description {text!r}"
    named = [w for w, rx in ((WeightingValues.T2, _T2_RE), (WeightingValues.T1, _T1_RE)) if rx.search(text)]
    if len(named) == 1:
        return named[0], f"'{named[0].value}' in description {text!r}"
    tr, te, ti = series.repetition_time, series.echo_time, series.inversion_time
    inversion = "IR" in series.scanning_sequence.upper().split("\\")
    if (inversion or ti is not None) and ti is not None and 80 <= ti <= 300:
        return WeightingValues.STIR, f"inversion recovery with TI {ti:g} ms"
    if tr is not None and te is not None:
        if tr <= 1000 and te <= 30:
            return WeightingValues.T1, f"TR {tr:g} ms, TE {te:g} ms"
        if tr >= 1500 and te >= 60:
            return WeightingValues.T2, f"TR {tr:g} ms, TE {te:g} ms"
    return WeightingValues.UNKNOWN, "no weighting in description or TR/TE"


def view_of(series: Series) -> ViewValues:
    """Projection of a radiograph from ViewPosition, else from the description."""
    view = (series.view_position or (series.instances[0].view_position if series.instances else "")).upper()
    if view in _FRONTAL_VIEWS:
        return ViewValues.FRONTAL
    if view in _LATERAL_VIEWS:
        return ViewValues.LATERAL
    text = f"{series.description} {series.protocol_name}"
    if re.search(r"\blat", text, re.IGNORECASE):
        return ViewValues.LATERAL
    if re.search(r"\b(ap|pa|frontal)\b", text, re.IGNORECASE):
        return ViewValues.FRONTAL
    return ViewValues.UNKNOWN


@dataclass(frozen=True)
class SeriesFeatures:
    """What the rules look at, computed once per series."""

    modality: str
    orientation: OrientationValues
    orientations: frozenset[OrientationValues]
    weighting: WeightingValues
    weighting_basis: str
    view: ViewValues
    n_images: int
    is_image: bool
    is_localizer: bool
    not_spine: str  # why the series is not of the spine, or ""

    @classmethod
    def from_series(cls, series: Series) -> SeriesFeatures:
        """Compute the features of one series from its headers."""
        orientations = [orientation_of(i.image_orientation) for i in series.instances]
        counts = {o: orientations.count(o) for o in set(orientations)}
        orientation = max(counts, key=counts.get) if counts else OrientationValues.UNKNOWN  # type: ignore[arg-type]
        weighting, basis = weighting_of(series) if series.modality == "MR" else (WeightingValues.UNKNOWN, "")
        image_type = set(series.image_type) | {t for i in series.instances[:1] for t in i.image_type}
        text = " ".join((series.description, series.protocol_name))
        localizer = "LOCALIZER" in image_type or bool(_LOCALIZER_RE.search(text))
        not_spine = ""
        body = series.body_part.upper()
        if body and ("SPINE" not in body or _NOT_SPINE_RE.search(body)) and "LUMBAR" not in body and "SACRUM" not in body:
            not_spine = f"body part {body}"
        elif _NOT_SPINE_RE.search(text) and not re.search(r"l[ -]?spine|lumbar", text, re.IGNORECASE):
            not_spine = f"description {series.description!r}"
        return cls(
            modality=series.modality.upper(),
            orientation=orientation,
            orientations=frozenset(o for o in counts if o is not OrientationValues.UNKNOWN),
            weighting=weighting,
            weighting_basis=basis,
            view=view_of(series),
            n_images=sum(i.number_of_frames for i in series.instances),
            is_image=any(i.rows for i in series.instances),
            is_localizer=localizer or len(counts.keys() - {OrientationValues.UNKNOWN}) > 1,
            not_spine=not_spine,
        )

    def describe(self) -> str:
        parts = [self.modality or "no modality"]
        if self.orientation is not OrientationValues.UNKNOWN:
            parts.append(self.orientation.value)
        if self.weighting is not WeightingValues.UNKNOWN:
            parts.append(f"{self.weighting.value} ({self.weighting_basis})")
        if self.view is not ViewValues.UNKNOWN and self.modality in ("DX", "CR"):
            parts.append(f"{self.view.value} view")
        parts.append(f"{self.n_images} image{'s' if self.n_images != 1 else ''}")
        return ", ".join(parts)


@dataclass(frozen=True)
class SeriesRule:
    """A role and the conditions a series must meet to get it (empty tuple: any).

    Parameters
    ----------
    role : SeriesRoleValues
        The role given when every condition holds.
    modalities : tuple of str
        Accepted Modality values.
    orientations, weightings, views : tuple
        Accepted orientation, MR weighting and radiograph view.
    min_images : int
        Fewest images (frames) the series must have.
    description : str, optional
        Regular expression the description or protocol name must match.

    Raises
    ------
    ValueError
        If ``modalities`` is empty or ``min_images`` < 1.
    """

    role: SeriesRoleValues
    modalities: tuple[str, ...]
    orientations: tuple[OrientationValues, ...] = ()
    weightings: tuple[WeightingValues, ...] = ()
    views: tuple[ViewValues, ...] = ()
    min_images: int = 1
    description: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", SeriesRoleValues(self.role))
        if not self.modalities:
            raise ValueError("modalities: at least one modality is required")
        if self.min_images < 1:
            raise ValueError(f"min_images: must be >= 1, got {self.min_images}")
        if self.description is not None:
            re.compile(self.description)

    def mismatch(self, series: Series, f: SeriesFeatures) -> str:
        """Why this rule does not apply, or ``""`` when it does."""
        if f.modality not in self.modalities:
            return f"modality {f.modality or 'none'} not in {'/'.join(self.modalities)}"
        if self.orientations and f.orientation not in self.orientations:
            return f"{f.orientation.value}, not {'/'.join(o.value for o in self.orientations)}"
        if self.weightings and f.weighting not in self.weightings:
            return f"weighting {f.weighting.value}, not {'/'.join(w.value for w in self.weightings)}"
        if self.views and f.view not in self.views:
            return f"view {f.view.value}, not {'/'.join(v.value for v in self.views)}"
        if f.n_images < self.min_images:
            return f"{f.n_images} images, fewer than {self.min_images}"
        text = f"{series.description} {series.protocol_name}"
        if self.description is not None and not re.search(self.description, text, re.IGNORECASE):
            return f"description {series.description!r} does not match {self.description!r}"
        return ""


_MR, _SAG, _AX = ("MR",), (OrientationValues.SAGITTAL,), (OrientationValues.AXIAL,)
_XR = ("DX", "CR")

#: The rules used unless others are given, tried in this order.
DEFAULT_RULES: tuple[SeriesRule, ...] = (
    SeriesRule(SeriesRoleValues.SAG_STIR, _MR, _SAG, (WeightingValues.STIR,), min_images=5),
    SeriesRule(SeriesRoleValues.SAG_T2, _MR, _SAG, (WeightingValues.T2,), min_images=5),
    SeriesRule(SeriesRoleValues.SAG_T1, _MR, _SAG, (WeightingValues.T1,), min_images=5),
    SeriesRule(SeriesRoleValues.AX_T2, _MR, _AX, (WeightingValues.T2,), min_images=3),
    SeriesRule(SeriesRoleValues.CT_AXIAL, ("CT",), _AX, min_images=10),
    SeriesRule(SeriesRoleValues.XRAY_AP, _XR, views=(ViewValues.FRONTAL,)),
    SeriesRule(SeriesRoleValues.XRAY_LAT, _XR, views=(ViewValues.LATERAL,)),
)


def classify_series(
    series: Series, rules: Sequence[SeriesRule] = DEFAULT_RULES
) -> tuple[SeriesRoleValues, str]:
    """The role of one series and the reason, without changing the series.

    Returns
    -------
    tuple of (SeriesRoleValues, str)
        The role (``OTHER`` when excluded or no rule matched) and a reason that
        names what was seen and the deciding rule or exclusion.
    """
    f = SeriesFeatures.from_series(series)
    seen = f.describe()
    if not f.is_image:
        return SeriesRoleValues.OTHER, f"{seen}: not an image series"
    if f.is_localizer:
        return SeriesRoleValues.OTHER, f"{seen}: localizer"
    if f.not_spine:
        return SeriesRoleValues.OTHER, f"{seen}: not the lumbar spine ({f.not_spine})"
    misses = []
    for rule in rules:
        why = rule.mismatch(series, f)
        if not why:
            return rule.role, f"{seen}: rule {rule.role.value}"
        if f.modality in rule.modalities:  # other modalities' rules say nothing useful
            misses.append(f"{rule.role.value}: {why}")
    detail = f" ({'; '.join(misses)})" if misses else ""
    return SeriesRoleValues.OTHER, f"{seen}: no rule matched{detail}"


def _rank(series: Series) -> tuple[int, int, int, str]:
    """Sort key among series of one role: original images first, then more images, lower number."""
    derived = "DERIVED" in series.image_type or "SECONDARY" in series.image_type
    n = sum(i.number_of_frames for i in series.instances)
    return (int(derived), -n, series.series_number if series.series_number is not None else 1 << 30,
            series.series_instance_uid)


def assign_roles(study: Study, rules: Sequence[SeriesRule] = DEFAULT_RULES) -> dict[SeriesRoleValues, Series]:
    """Give every series of ``study`` its role and reason, in place.

    Series of the same role are reordered among themselves, best first (original
    before derived, more images, lower series number), keeping the slots other
    roles occupy in ``study.series``; the best one's reason says it is preferred.

    Returns
    -------
    dict
        The preferred series of each role found (``OTHER`` excluded).
    """
    for series in study.series:
        series.role, series.role_reason = classify_series(series, rules)
    chosen: dict[SeriesRoleValues, Series] = {}
    for role in {s.role for s in study.series} - {SeriesRoleValues.OTHER}:
        slots = [i for i, s in enumerate(study.series) if s.role is role]
        ranked = sorted((study.series[i] for i in slots), key=_rank)
        for i, series in zip(slots, ranked):
            study.series[i] = series
        chosen[role] = ranked[0]
        if len(ranked) > 1:
            others = ", ".join(s.series_instance_uid for s in ranked[1:])
            ranked[0].role_reason += f"; preferred over {others}"
    return chosen


def select_series(
    study: Study, role: SeriesRoleValues, rules: Sequence[SeriesRule] = DEFAULT_RULES
) -> Series:
    """The preferred series of ``role`` (roles are assigned first).

    Raises
    ------
    SeriesSelectionError
        If no series has that role; the error lists every series seen with its role and reason.
    """
    role = SeriesRoleValues(role)
    chosen = assign_roles(study, rules)
    if role in chosen:
        return chosen[role]
    candidates = [
        f"{s.series_instance_uid} {s.description!r} -> {s.role.value} ({s.role_reason})" for s in study.series
    ]
    raise SeriesSelectionError(
        f"no {role.value} series in study {study.study_instance_uid}", candidates or ["no series at all"]
    )


def series_uses(study: Study) -> list[SeriesUse]:
    """The roles of the study's series as recorded in a StudyResult."""
    return [
        SeriesUse(s.series_instance_uid, s.role, s.role_reason, s.description, s.modality) for s in study.series
    ]
