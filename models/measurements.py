"""Spine measurements from a labelled sagittal mask: body and disc heights, slip, canal, lordosis.

One code path for predicted and reference masks, so both are measured alike.

Conventions
-----------
``labels`` is a 2-D integer array holding one upright sagittal image: row 0 is
superior (cranial), column 0 anterior. Label values follow the VerSe numbering
(:data:`VERTEBRA_LABELS`): vertebral bodies T9-L5 = 16-24, S1 = 26; a disc is 100 +
the label of the vertebra above (:func:`disc_label`, L4-L5 = 123); the spinal canal
is :data:`CANAL_LABEL`. Only the largest connected component (8-connected) of each
body and disc label is used, so small stray specks do not count; the canal keeps every
piece of at least 20 mm^2 (a severe stenosis can pinch it in two).

``spacing_mm`` is (row spacing, column spacing). All geometry is done in millimetre
coordinates ``(y, x) = (row * row spacing, column * column spacing)``, so results hold
for anisotropic pixels. Output points are ``(row, column)`` in fractional array
indices with pixel centres at whole numbers; they come in pairs, each pair one
segment a measurement was taken along.

Every structure gets a local frame: a cranio-caudal axis and, perpendicular to it,
an antero-posterior (AP) direction. For a body, the axis is perpendicular to the mean
direction of its superior and inferior endplate lines (found iteratively, starting
from the direction between the neighbouring structures' centroids, or the image
columns for a lone structure, so the spine must run within about 45 degrees of the
columns). Endplate lines are least-squares lines, refitted once without outliers,
through the border points of the central :data:`ENDPLATE_SPAN` of the AP depth;
wall lines likewise through the anterior and posterior border points of the central
:data:`ENDPLATE_SPAN` of the middle height. A corner is where an endplate line meets
a wall line, so rounded corners and small osteophytes do not move it. A disc's axis
is perpendicular to the mean direction of the adjacent endplates of the bodies above
and below (one of them where only one is present; its own borders where neither is).

The S1 label is taken to be the S1 body. Its axis follows its superior endplate alone
(its lower part may be fused with S2 or cut off), and no S1 heights are reported:
S1 serves as the lower reference of the L5-S1 segment and of lordosis.

Numpy and scipy only. Nothing here draws: the ``points`` of each measurement are
for whoever renders a key image or writes a structured report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------- labels

#: Vertebral body label values (VerSe numbering), cranial to caudal. VerSe's L6 (25) is not used.
VERTEBRA_LABELS: dict[str, int] = {
    "T9": 16, "T10": 17, "T11": 18, "T12": 19, "L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 24, "S1": 26,
}
#: Vertebra names, cranial to caudal.
VERTEBRAE: tuple[str, ...] = tuple(VERTEBRA_LABELS)
#: Disc names, cranial to caudal ("T9-T10" ... "L5-S1").
DISCS: tuple[str, ...] = tuple(f"{a}-{b}" for a, b in zip(VERTEBRAE[:-1], VERTEBRAE[1:]))
#: Label of the spinal canal.
CANAL_LABEL = 200
#: Level name of the lumbar lordosis measurement.
LORDOSIS_LEVEL = "L1-S1"


def disc_label(name: str) -> int:
    """Label value of a disc: 100 + the label of the vertebra above (``"L4-L5"`` -> 123).

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`DISCS`.
    """
    if name not in DISCS:
        raise ValueError(f"name: not a disc level, got {name!r}; known: {', '.join(DISCS)}")
    return 100 + VERTEBRA_LABELS[name.split("-")[0]]


#: Level name of every label value (bodies, discs and the canal).
LABEL_NAMES: dict[int, str] = {
    **{v: k for k, v in VERTEBRA_LABELS.items()},
    **{disc_label(d): d for d in DISCS},
    CANAL_LABEL: "canal",
}

# --------------------------------------------------------------------------- vocabulary

ANTERIOR_BODY_HEIGHT = "anterior body height"
MIDDLE_BODY_HEIGHT = "middle body height"
POSTERIOR_BODY_HEIGHT = "posterior body height"
WEDGE_RATIO = "wedge ratio"
BICONCAVITY_RATIO = "biconcavity ratio"
BODY_HEIGHT_LOSS = "body height loss"
DISC_HEIGHT_ANTERIOR = "disc height anterior"
DISC_HEIGHT_MIDDLE = "disc height middle"
DISC_HEIGHT_POSTERIOR = "disc height posterior"
SLIP = "slip"
SLIP_PERCENT = "slip percent"
CANAL_AP_DIAMETER = "canal AP diameter"
LORDOSIS = "lordosis L1-S1"

#: Every measurement name with its UCUM unit.
UNITS: dict[str, str] = {
    ANTERIOR_BODY_HEIGHT: "mm", MIDDLE_BODY_HEIGHT: "mm", POSTERIOR_BODY_HEIGHT: "mm",
    WEDGE_RATIO: "1", BICONCAVITY_RATIO: "1", BODY_HEIGHT_LOSS: "%",
    DISC_HEIGHT_ANTERIOR: "mm", DISC_HEIGHT_MIDDLE: "mm", DISC_HEIGHT_POSTERIOR: "mm",
    SLIP: "mm", SLIP_PERCENT: "%", CANAL_AP_DIAMETER: "mm", LORDOSIS: "deg",
}
#: Measurement names, in report order.
MEASUREMENT_NAMES: tuple[str, ...] = tuple(UNITS)

GENANT_GRADE = "Genant grade"
MEYERDING_GRADE = "Meyerding grade"
CENTRAL_STENOSIS = "central canal stenosis"
#: Every category name with its possible values, lowest first.
CATEGORY_VALUES: dict[str, tuple[str, ...]] = {
    GENANT_GRADE: ("0", "1", "2", "3"),
    MEYERDING_GRADE: ("0", "I", "II", "III", "IV", "V"),
    CENTRAL_STENOSIS: ("normal", "relative", "absolute"),
}

# --------------------------------------------------------------------------- definitions

#: Where body and disc heights are taken, as fractions of the AP depth from the anterior
#: border: inset from both ends so rounded corners and osteophytes do not shorten them.
HEIGHT_FRACTIONS: tuple[float, float, float] = (0.15, 0.50, 0.85)
#: Central share of the AP depth (of the height, for walls) whose border points fit a line.
ENDPLATE_SPAN = 0.70
#: Genant grade thresholds, height loss in percent: grade 1 from 20, 2 from 25, 3 from 40.
GENANT_THRESHOLDS: tuple[float, float, float] = (20.0, 25.0, 40.0)
#: Meyerding grade thresholds, slip in percent: II from 25, III from 50, IV from 75, V from 100.
MEYERDING_THRESHOLDS: tuple[float, float, float, float] = (25.0, 50.0, 75.0, 100.0)
#: Below this slip (percent of the lower endplate, either direction) the grade is "0". Two corner
#: constructions each carry about a pixel of error; 5 % of a 35-45 mm lumbar endplate (2-2.5 mm)
#: is a few pixels at sagittal MR resolution, so a smaller slip cannot be told from that error.
NO_SLIP_PERCENT = 5.0
#: Canal AP diameter thresholds (mm): below 10 absolute, below 13 relative stenosis.
STENOSIS_THRESHOLDS_MM: tuple[float, float] = (10.0, 13.0)

_MAX_ITERATIONS = 8
_CONVERGED_RAD = np.deg2rad(0.05)


# --------------------------------------------------------------------------- results


def _check_level(level: Any) -> str:
    if not isinstance(level, str):
        raise TypeError(f"level: must be a str, got {type(level).__name__}")
    if level not in VERTEBRAE and level not in DISCS and level != LORDOSIS_LEVEL:
        raise ValueError(f"level: unknown level {level!r}")
    return level


@dataclass(frozen=True)
class Measurement:
    """One number measured at one level.

    Parameters
    ----------
    level : str
        A vertebra (``"L3"``), a disc or segment (``"L4-L5"``), or ``"L1-S1"``.
    name : str
        One of :data:`MEASUREMENT_NAMES`.
    value : float
        The value, in ``unit``.
    unit : str
        UCUM code; must be ``UNITS[name]``.
    points : tuple of (float, float)
        ``(row, column)`` pixel coordinates in pairs, each pair a segment the value was
        measured along; empty for values derived from other measurements.
    basis : str
        How the value was obtained where the name alone does not say.

    Raises
    ------
    TypeError
        If a field has the wrong type.
    ValueError
        If the level or name is unknown, the unit does not match the name, the value is
        not finite, or the points are not finite pairs.
    """

    level: str
    name: str
    value: float
    unit: str
    points: tuple[tuple[float, float], ...] = ()
    basis: str = ""

    def __post_init__(self) -> None:
        _check_level(self.level)
        if self.name not in UNITS:
            raise ValueError(f"name: unknown measurement {self.name!r}; known: {', '.join(MEASUREMENT_NAMES)}")
        if self.unit != UNITS[self.name]:
            raise ValueError(f"unit: {self.name!r} is in {UNITS[self.name]!r}, got {self.unit!r}")
        if not isinstance(self.value, Real) or isinstance(self.value, bool):
            raise TypeError(f"value: must be a real number, got {type(self.value).__name__}")
        if not np.isfinite(self.value):
            raise ValueError(f"value: must be finite, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))
        try:
            pts = np.asarray(self.points, dtype=float).reshape(len(self.points), 2)
        except (TypeError, ValueError):
            pts = np.full((1, 2), np.nan)
        if len(pts) % 2 or not np.all(np.isfinite(pts)):
            raise ValueError(f"points: need finite (row, column) pairs in segments of two, got {self.points!r}")
        object.__setattr__(self, "points", tuple((float(r), float(c)) for r, c in pts))
        if not isinstance(self.basis, str):
            raise TypeError(f"basis: must be a str, got {type(self.basis).__name__}")


@dataclass(frozen=True)
class Category:
    """A category derived from measurements (a grade), with the numbers it rests on.

    Parameters
    ----------
    level : str
        As for :class:`Measurement`.
    name : str
        One of :data:`CATEGORY_VALUES`.
    value : str
        One of ``CATEGORY_VALUES[name]``.
    basis : str
        The measured value and the published definition it was graded by.

    Raises
    ------
    TypeError
        If a field is not a str.
    ValueError
        If the level or name is unknown or the value is not one of the name's values.
    """

    level: str
    name: str
    value: str
    basis: str

    def __post_init__(self) -> None:
        _check_level(self.level)
        if self.name not in CATEGORY_VALUES:
            raise ValueError(f"name: unknown category {self.name!r}; known: {', '.join(CATEGORY_VALUES)}")
        if self.value not in CATEGORY_VALUES[self.name]:
            raise ValueError(f"value: {self.name!r} is one of {CATEGORY_VALUES[self.name]}, got {self.value!r}")
        if not isinstance(self.basis, str):
            raise TypeError(f"basis: must be a str, got {type(self.basis).__name__}")


@dataclass(frozen=True)
class SagittalMeasurements:
    """Everything measured on one labelled sagittal image.

    ``notes`` says why a structure present in the mask gave no measurement (for
    example, cut by the image edge); structures absent from the mask are not noted.
    """

    measurements: tuple[Measurement, ...]
    categories: tuple[Category, ...]
    notes: tuple[str, ...] = ()

    def get(self, level: str, name: str) -> Measurement | None:
        """The measurement ``name`` at ``level``, or None when it was not measured."""
        return next((m for m in self.measurements if m.level == level and m.name == name), None)

    def category(self, level: str, name: str) -> Category | None:
        """The category ``name`` at ``level``, or None when it was not derived."""
        return next((c for c in self.categories if c.level == level and c.name == name), None)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per measurement, then per category: ``level, measurement, unit, value`` (for a CSV).

        Categories have an empty unit and their grade as value.
        """
        rows: list[dict[str, Any]] = [
            {"level": m.level, "measurement": m.name, "unit": m.unit, "value": m.value} for m in self.measurements
        ]
        rows += [{"level": c.level, "measurement": c.name, "unit": "", "value": c.value} for c in self.categories]
        return rows


# --------------------------------------------------------------------------- grades


def genant_grade(height_loss_percent: float) -> str:
    """Genant semi-quantitative grade of a vertebral body height loss.

    Grade 0 below 20 %, 1 (mild) 20-25 %, 2 (moderate) 25-40 %, 3 (severe) above 40 %;
    a value on a boundary takes the higher grade. Genant HK, Wu CY, van Kuijk C, Nevitt
    MC. Vertebral fracture assessment using a semiquantitative technique. J Bone Miner
    Res 1993;8:1137-48.

    Raises
    ------
    ValueError
        If the loss is not a finite number from 0 to 100.
    """
    loss = float(height_loss_percent)
    if not 0.0 <= loss <= 100.0:
        raise ValueError(f"height_loss_percent: must be from 0 to 100, got {height_loss_percent!r}")
    return CATEGORY_VALUES[GENANT_GRADE][int(np.searchsorted(GENANT_THRESHOLDS, loss, side="right"))]


def meyerding_grade(slip_percent: float) -> str:
    """Meyerding grade of a slip given in percent of the lower endplate (sign ignored).

    ``"0"`` below :data:`NO_SLIP_PERCENT`; I below 25 %, II 25-50 %, III 50-75 %,
    IV 75-100 %, V beyond 100 %; a value on a boundary takes the higher grade. Meyerding
    HW. Spondylolisthesis. Surg Gynecol Obstet 1932;54:371-7. Meyerding graded forward
    slips; a backward slip (retrolisthesis) is graded here by the same percentages.

    Raises
    ------
    ValueError
        If the slip is not finite.
    """
    slip = abs(float(slip_percent))
    if not np.isfinite(slip):
        raise ValueError(f"slip_percent: must be finite, got {slip_percent!r}")
    if slip < NO_SLIP_PERCENT:
        return "0"
    return CATEGORY_VALUES[MEYERDING_GRADE][1 + int(np.searchsorted(MEYERDING_THRESHOLDS, slip, side="right"))]


def stenosis_category(diameter_mm: float) -> str:
    """Central canal stenosis from the canal's AP diameter.

    Below 10 mm absolute, 10 to under 13 mm relative stenosis, 13 mm and more normal
    (Verbiest's thresholds, summarised in Steurer J, Roner S, Gnannt R, Hodler J.
    Quantitative radiologic criteria for the diagnosis of lumbar spinal stenosis: a
    systematic literature review. BMC Musculoskelet Disord 2011;12:175).

    Raises
    ------
    ValueError
        If the diameter is negative or not finite.
    """
    d = float(diameter_mm)
    if not (np.isfinite(d) and d >= 0.0):
        raise ValueError(f"diameter_mm: must be a finite length >= 0, got {diameter_mm!r}")
    if d < STENOSIS_THRESHOLDS_MM[0]:
        return "absolute"
    return "relative" if d < STENOSIS_THRESHOLDS_MM[1] else "normal"


# --------------------------------------------------------------------------- geometry


def _ap_of(axis: np.ndarray) -> np.ndarray:
    """The AP direction of a caudal axis: turned a quarter so an upright axis gives +columns (posterior)."""
    return np.array([-axis[1], axis[0]])


@dataclass(frozen=True)
class _Line:
    point: np.ndarray  # mm (y, x)
    direction: np.ndarray  # unit


def _intersect(p: _Line, q: _Line) -> np.ndarray | None:
    m = np.column_stack([p.direction, -q.direction])
    if abs(np.linalg.det(m)) < 1e-6:
        return None
    s, _ = np.linalg.solve(m, q.point - p.point)
    return p.point + s * p.direction


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], lo[1]], [hi[0], hi[1]]])


class _Shape:
    """One label's largest component, sampled along lines in mm.

    ``mask`` is the component within a box of an image of ``image_shape``, the box's first
    pixel at ``offset``.
    """

    #: Samples per probe (see ``runs``): one pixel of the finer spacing.
    STRIDE = 8

    def __init__(self, mask: np.ndarray, offset: tuple[int, int], image_shape: tuple[int, ...],
                 spacing: np.ndarray) -> None:
        self.spacing = spacing
        self.image_shape = image_shape
        rr, cc = np.nonzero(mask)
        rr, cc = rr + offset[0], cc + offset[1]
        self.centre = np.array([rr.mean() * spacing[0], cc.mean() * spacing[1]])
        first, last = np.array([rr.min(), cc.min()]), np.array([rr.max(), cc.max()])
        # bounding box grown by two pixels, so a line sampled to its far corner leaves the component
        # (and the image, where the component touches the edge)
        self.corners = _box_corners((first - 2.0) * spacing, (last + 2.0) * spacing)
        # corners of the kept grid (below) less its ring, grown by half a pixel: no sample beyond them
        # rounds to a pixel of the component
        self.grid_corners = _box_corners((first - 1.5) * spacing, (last + 1.5) * spacing)
        # fine enough that a sampled border lies within a small share of a pixel of the mask's
        self.step = float(spacing.min()) / 8.0
        # Only a grid around the component is kept, its box grown by two pixels, so the outer
        # ring is empty in ``mask`` and ``kind`` and stands for every pixel beyond it. ``kind``
        # sorts each pixel as outside (0: no component pixel among it and its eight
        # neighbours), inside (2: all nine in the component) or border (1).
        self.origin = first - 2
        grid = tuple(slice(a - o, b - o + 5) for a, b, o in zip(first, last, offset))  # in the padded mask
        grown = np.pad(mask, 2)[grid]
        eight = np.ones((3, 3), dtype=bool)
        kind = ndimage.binary_dilation(grown, eight).astype(np.int8) + ndimage.binary_erosion(grown, eight)
        self.grid_shape = grown.shape
        self.mask, self.kind = grown.ravel(), kind.ravel()
        # a sample next to one in the component is in the image unless the component touches its edge
        self.at_edge = bool(first.min() == 0 or last[0] == image_shape[0] - 1 or last[1] == image_shape[1] - 1)

    def reach(self, origins: np.ndarray) -> float:
        """Distance from the farthest origin to the farthest corner of the grown bounding box."""
        return float(np.linalg.norm(origins[:, None, :] - self.corners[None], axis=-1).max())

    def _pixels(self, origins: np.ndarray, direction: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image row and column of the pixels holding samples ``origins[:, None] + t * direction``."""
        r = np.rint((origins[:, 0, None] + t * direction[0]) / self.spacing[0]).astype(np.int64)
        c = np.rint((origins[:, 1, None] + t * direction[1]) / self.spacing[1]).astype(np.int64)
        return r, c

    def runs(self, origins: np.ndarray, direction: np.ndarray, forward_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """First and last parameter inside the mask on lines ``origin + t * direction``.

        ``t`` runs over the whole component (from 0 only, with ``forward_only``). The values
        are the borders of the run from the first to the last inside sample; NaN where a
        line misses the mask or its run reaches the image edge (a structure cut off there
        cannot be measured).
        """
        reach = self.reach(origins)
        t = np.arange(0.0 if forward_only else -reach, reach + self.step / 2, self.step)
        n = len(t)
        # The result is that of looking up every sample, but few are looked up. Samples are
        # taken in groups, STRIDE samples round every STRIDE-th, the group's probe: they lie
        # within half a pixel of the probe along each axis, so in the probe's pixel or a
        # neighbour. A group whose probe is in an outside pixel is outside, one whose probe is
        # in an inside pixel is inside; only the samples of border groups are looked up.
        # Groups are probed only where a line passes the grid (its projection on the line,
        # and a group more at either end).
        stride, half = self.STRIDE, self.STRIDE // 2
        span = stride * self.step
        ends = self.grid_corners @ direction
        along = origins @ direction
        g0 = np.floor((ends.min() - along - t[0]) / span).astype(np.int64) - 1
        g = np.clip(g0[:, None] + np.arange(int(np.ceil(np.ptp(ends) / span)) + 4), 0, (n - 1 + half) // stride)
        at = t[0] + span * g
        cell = [np.clip(at * (direction[k] / self.spacing[k]) + (origins[:, k, None] / self.spacing[k] + 0.5
                                                                - self.origin[k]), 0, self.grid_shape[k] - 0.5)
                .astype(np.int64) for k in range(2)]  # rounded half up; beyond the grid, its ring
        kind = self.kind[cell[0] * self.grid_shape[1] + cell[1]]
        first = np.where(kind == 2, stride * g - half, n).min(axis=1)
        last = np.where(kind == 2, stride * g + half - 1, -1).max(axis=1)
        line, col = np.nonzero(kind == 1)
        if len(line):
            # a border group's samples lie in the grid short of its ring
            j = np.clip((stride * g[line, col] - half)[:, None] + np.arange(stride), 0, n - 1)
            r, c = self._pixels(origins[line], direction, t[j])
            hit = self.mask[(r - self.origin[0]) * self.grid_shape[1] + (c - self.origin[1])]
            np.minimum.at(first, line, np.where(hit, j, n).min(axis=1))
            np.maximum.at(last, line, np.where(hit, j, -1).max(axis=1))
        first, last = np.maximum(first, 0), np.minimum(last, n - 1)
        ok = (last >= first) & (first > 0) & (last < n - 1)
        if self.at_edge and ok.any():
            # the samples just before and after the run must lie in the image
            i = np.nonzero(ok)[0]
            r, c = self._pixels(origins[i], direction, t[np.stack([first[i] - 1, last[i] + 1], axis=1)])
            ok[i] = np.all((r >= 0) & (r < self.image_shape[0]) & (c >= 0) & (c < self.image_shape[1]), axis=1)
        lo = np.where(ok, t[np.minimum(first, n - 1)] - self.step / 2, np.nan)
        hi = np.where(ok, t[np.maximum(last, 0)] + self.step / 2, np.nan)
        return lo, hi

    def extent(self, origin: np.ndarray, direction: np.ndarray, forward_only: bool = False) -> tuple[float, float] | None:
        """``runs`` of one line, or None."""
        lo, hi = self.runs(origin[None], direction, forward_only)
        return None if np.isnan(lo[0]) else (float(lo[0]), float(hi[0]))


def _fit(s: np.ndarray, t: np.ndarray, centre: np.ndarray, along: np.ndarray, across: np.ndarray,
         tolerance: float) -> tuple[_Line, float] | None:
    """Line ``t = m s + b`` through border points ``centre + s along + t across``, and its slope ``m``.

    One refit without points farther than 3 robust SDs (at least ``tolerance``) from the
    first line, so an osteophyte, a Schmorl node or a notch does not tilt it.
    """
    keep = np.isfinite(t)
    s, t = s[keep], t[keep]
    if len(s) < 3 or np.ptp(s) <= 0:
        return None
    m, b = np.polyfit(s, t, 1)
    res = np.abs(t - (m * s + b))
    good = res <= max(3.0 * 1.4826 * float(np.median(res)), tolerance)
    if 3 <= good.sum() < len(s):
        s, t = s[good], t[good]
        m, b = np.polyfit(s, t, 1)
    sm = float(s.mean())
    direction = along + m * across
    return _Line(centre + sm * along + (m * sm + b) * across, direction / np.linalg.norm(direction)), float(m)


@dataclass(frozen=True)
class _Outline:
    """A structure's frame, AP extent and border lines (all mm)."""

    centre: np.ndarray
    axis: np.ndarray  # unit, caudal
    ap: np.ndarray  # unit, posterior
    anterior: float  # AP extent through the centre, as parameters along ``ap``
    posterior: float
    superior: _Line | None
    inferior: _Line | None

    def at(self, fraction: float) -> np.ndarray:
        """Point on the AP line through the centre at ``fraction`` of the depth from the anterior border."""
        return self.centre + (self.anterior + fraction * (self.posterior - self.anterior)) * self.ap


def _outline(shape: _Shape, axis: np.ndarray, refine: tuple[str, ...]) -> _Outline | None:
    """Frame of ``shape`` starting from ``axis``, turned until perpendicular to the ``refine`` endplates.

    None when the AP line through the centroid has no complete run.
    """
    axis = axis / np.linalg.norm(axis)
    tol = float(shape.spacing.max())
    for _ in range(_MAX_ITERATIONS):
        ap = _ap_of(axis)
        width = shape.extent(shape.centre, ap)
        if width is None:
            return None
        ant, post = width
        margin = (1.0 - ENDPLATE_SPAN) / 2.0 * (post - ant)
        us = np.arange(ant + margin, post - margin, shape.step * 4)
        lo, hi = shape.runs(shape.centre + us[:, None] * ap, axis)
        sup = _fit(us, lo, shape.centre, ap, axis, tol)
        inf = _fit(us, hi, shape.centre, ap, axis, tol)
        out = _Outline(shape.centre, axis, ap, ant, post, sup[0] if sup else None, inf[0] if inf else None)
        slopes = [f[1] for side, f in (("superior", sup), ("inferior", inf)) if side in refine and f is not None]
        if not slopes:
            return out
        phi = float(np.mean(np.arctan(slopes)))
        if abs(phi) < _CONVERGED_RAD:
            return out
        axis = np.cos(phi) * axis - np.sin(phi) * ap
    return out


def _heights(shape: _Shape, o: _Outline) -> list[tuple[float, np.ndarray, np.ndarray] | None]:
    """Extent of the mask along the axis on lines at :data:`HEIGHT_FRACTIONS`: (mm, start, end) or None."""
    origins = np.array([o.at(f) for f in HEIGHT_FRACTIONS])
    lo, hi = shape.runs(origins, o.axis)
    return [None if np.isnan(a) else (float(b - a), p + a * o.axis, p + b * o.axis) for p, a, b in zip(origins, lo, hi)]


def _corners(shape: _Shape, o: _Outline) -> dict[str, np.ndarray]:
    """Corners where the endplate lines meet the wall lines: keys ``SA, SP, IA, IP`` (those found)."""
    mid = shape.runs(o.at(0.5)[None], o.axis)
    if np.isnan(mid[0][0]):
        return {}
    top, bottom = float(mid[0][0]), float(mid[1][0])
    margin = (1.0 - ENDPLATE_SPAN) / 2.0 * (bottom - top)
    vs = np.arange(top + margin, bottom - margin, shape.step * 4)
    base = o.at(0.5)
    ant, post = shape.runs(base + vs[:, None] * o.axis, o.ap)
    tol = float(shape.spacing.max())
    walls = {"A": _fit(vs, ant, base, o.axis, o.ap, tol), "P": _fit(vs, post, base, o.axis, o.ap, tol)}
    plates = {"S": o.superior, "I": o.inferior}
    out = {}
    for pk, plate in plates.items():
        for wk, wall in walls.items():
            if plate is not None and wall is not None:
                point = _intersect(plate, wall[0])
                if point is not None:
                    out[pk + wk] = point
    return out


def _posterior(line: _Line, ap: np.ndarray) -> np.ndarray:
    """The line's direction, pointing posterior."""
    return line.direction if line.direction @ ap >= 0 else -line.direction


def _axis_across(lines: Sequence[tuple[_Line, np.ndarray]]) -> np.ndarray:
    """Caudal axis perpendicular to the mean direction of endplate lines (each with its structure's AP)."""
    e = np.sum([_posterior(line, ap) for line, ap in lines], axis=0)
    return np.array([e[1], -e[0]]) / np.linalg.norm(e)


# --------------------------------------------------------------------------- entry point


def _validate(labels: Any, spacing_mm: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels: must be a numpy array, got {type(labels).__name__}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels: must hold integer labels, got dtype {labels.dtype}")
    if labels.ndim != 2:
        raise ValueError(f"labels: must be a 2-D sagittal image, got shape {labels.shape}")
    if min(labels.shape) < 2:
        raise ValueError(f"labels: image of shape {labels.shape} is too small")
    if isinstance(spacing_mm, (str, bytes)) or not isinstance(spacing_mm, Sequence | np.ndarray):
        raise TypeError(f"spacing_mm: must be a (row, column) pair of numbers, got {spacing_mm!r}")
    if len(spacing_mm) != 2:
        raise ValueError(f"spacing_mm: must be a (row, column) pair, got {spacing_mm!r}")
    if not all(isinstance(s, Real) and not isinstance(s, bool) for s in spacing_mm):
        raise TypeError(f"spacing_mm: must hold numbers, got {spacing_mm!r}")
    spacing = np.asarray(spacing_mm, dtype=float)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise ValueError(f"spacing_mm: must be finite and > 0, got {spacing_mm!r}")
    return labels, spacing


def _largest_component(mask: np.ndarray) -> np.ndarray:
    comp, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return comp == int(np.argmax(sizes))


def _without_specks(mask: np.ndarray, spacing: np.ndarray, min_mm2: float = 20.0) -> np.ndarray:
    comp, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(comp.ravel()) * float(spacing[0] * spacing[1])
    sizes[0] = 0
    return np.isin(comp, np.flatnonzero(sizes >= min_mm2)) if (sizes >= min_mm2).any() else _largest_component(mask)


def _segment(*points: np.ndarray, spacing: np.ndarray) -> tuple[tuple[float, float], ...]:
    return tuple((float(p[0] / spacing[0]), float(p[1] / spacing[1])) for p in points)


def measure_sagittal(labels: np.ndarray, spacing_mm: Sequence[float]) -> SagittalMeasurements:
    """Measure every level a labelled sagittal image allows.

    Per vertebral body (T9-L5): anterior, middle and posterior height (mm), wedge ratio
    (anterior / posterior), biconcavity ratio (middle / posterior), height loss (%) and
    Genant grade. Per disc: anterior, middle and posterior height (mm), the canal's AP
    diameter (mm) and central stenosis category. Per pair of adjacent bodies: slip (mm,
    %) and Meyerding grade. Once: lumbar lordosis L1-S1 (degrees). What the mask does
    not allow (a level missing, a neighbour missing, a structure cut by the image edge)
    is skipped.

    Parameters
    ----------
    labels : numpy.ndarray
        2-D integer array, upright (row 0 superior, column 0 anterior), labels as in the
        module docstring.
    spacing_mm : sequence of float
        (row spacing, column spacing) in mm.

    Returns
    -------
    SagittalMeasurements
        Measurements and categories, cranial to caudal.

    Raises
    ------
    TypeError
        If ``labels`` is not an integer numpy array, or ``spacing_mm`` not a pair of numbers.
    ValueError
        If ``labels`` is not 2-D, or ``spacing_mm`` not two finite positive values.

    Notes
    -----
    Definitions:

    Heights
        Extent of the structure's mask along its axis on lines at 15, 50 and 85 % of its
        AP depth from the anterior border (depth measured along the AP direction through
        the centroid). For a trapezoid of corner heights Ha and Hp the anterior height is
        therefore ``Ha + 0.15 (Hp - Ha)``, not Ha.
    Height loss
        ``100 * (1 - smallest / largest)`` of the same body's three heights: the
        reference is the largest of its own anterior, middle and posterior heights, so a
        wedge, biconcave or (posterior) crush deformity counts, while a body flattened evenly does
        not (that needs neighbouring levels, which are not compared here).
    Slip
        Displacement of the upper body's posterior-inferior corner from the lower body's
        posterior-superior corner, along the lower body's superior endplate line; positive
        when the upper body lies anterior (anterolisthesis), negative for retrolisthesis.
        Slip percent is that over the length of the lower body's superior endplate
        (anterior-superior to posterior-superior corner). Levels are named by segment
        (``"L4-L5"`` for L4 on L5).
    Canal AP diameter
        Extent of the canal mask along the disc's AP direction (perpendicular to the disc
        axis, i.e. parallel to the endplates) on the line through the disc's centroid,
        posterior to it.
    Lordosis
        Angle between the L1 superior endplate line and the S1 superior endplate line,
        positive when they converge posteriorly (lordosis). The S1 line is fitted to the S1
        body's superior border, or, without an S1 label, to the inferior border of the
        L5-S1 disc; the measurement's ``basis`` says which.
    """
    labels, spacing = _validate(labels, spacing_mm)
    # each label is looked at within its bounding box only
    boxes = ndimage.find_objects(labels, max_label=max(LABEL_NAMES))
    shapes: dict[str, _Shape] = {}
    for value, name in LABEL_NAMES.items():
        box = boxes[value - 1]
        if box is not None:
            # The canal keeps every piece but specks: a severe stenosis can pinch it in two, and
            # the levels beyond the pinch still have their own canal to measure.
            mask = (_without_specks(labels[box] == value, spacing) if value == CANAL_LABEL
                    else _largest_component(labels[box] == value))
            shapes[name] = _Shape(mask, (box[0].start, box[1].start), labels.shape, spacing)
    chain = [n for v, d in zip(VERTEBRAE, DISCS + ("",)) for n in (v, d) if n in shapes]

    def guess(name: str) -> np.ndarray:
        # direction between the neighbouring structures' centroids; the image columns alone
        i = chain.index(name)
        above, below = chain[max(i - 1, 0)], chain[min(i + 1, len(chain) - 1)]
        d = shapes[below].centre - shapes[above].centre
        return d if np.linalg.norm(d) > 0 else np.array([1.0, 0.0])

    measurements: list[Measurement] = []
    categories: list[Category] = []
    notes: list[str] = []
    bodies: dict[str, _Outline] = {}
    corners: dict[str, dict[str, np.ndarray]] = {}
    for name in VERTEBRAE:
        if name not in shapes:
            continue
        refine = ("superior",) if name == "S1" else ("superior", "inferior")
        o = _outline(shapes[name], guess(name), refine)
        if o is None:
            notes.append(f"{name}: body not measurable (no complete AP run through its centre)")
            continue
        bodies[name] = o
        corners[name] = _corners(shapes[name], o)
        if name != "S1":
            _body_heights(name, shapes[name], o, spacing, measurements, categories, notes)

    discs: dict[str, _Outline] = {}
    for upper, lower in zip(VERTEBRAE[:-1], VERTEBRAE[1:]):
        name = f"{upper}-{lower}"
        if name not in shapes:
            continue
        plates = [(bodies[upper].inferior, bodies[upper].ap)] if upper in bodies and bodies[upper].inferior else []
        plates += [(bodies[lower].superior, bodies[lower].ap)] if lower in bodies and bodies[lower].superior else []
        if plates:
            o = _outline(shapes[name], _axis_across(plates), ())
        else:
            o = _outline(shapes[name], guess(name), ("superior", "inferior"))
        if o is None:
            notes.append(f"{name}: disc not measurable (no complete AP run through its centre)")
            continue
        discs[name] = o
        _three_heights(name, "disc", (DISC_HEIGHT_ANTERIOR, DISC_HEIGHT_MIDDLE, DISC_HEIGHT_POSTERIOR), shapes[name], o,
                       spacing, measurements, notes)
        if "canal" in shapes:
            _canal(name, shapes["canal"], o, spacing, measurements, categories, notes)

    for upper, lower in zip(VERTEBRAE[:-1], VERTEBRAE[1:]):
        if upper in corners and lower in corners:
            _slip(upper, lower, corners, bodies[lower], spacing, measurements, categories)

    _lordosis(bodies, discs, corners, spacing, measurements)
    order = {n: i for i, n in enumerate(chain)}
    measurements.sort(key=lambda m: order.get(m.level, len(order)))
    categories.sort(key=lambda c: order.get(c.level, len(order)))
    return SagittalMeasurements(tuple(measurements), tuple(categories), tuple(notes))


def _three_heights(name: str, kind: str, keys: tuple[str, str, str], shape: _Shape, o: _Outline, spacing: np.ndarray,
                   measurements: list[Measurement], notes: list[str]) -> list[float] | None:
    """Record the anterior, middle and posterior heights of a body or disc (``kind``); None if one is missing."""
    hs = [h for h in _heights(shape, o) if h is not None]
    if len(hs) < len(HEIGHT_FRACTIONS):
        notes.append(f"{name}: {kind} heights not measurable (a height line misses the {kind} or reaches the edge)")
        return None
    for key, (length, p0, p1) in zip(keys, hs):
        measurements.append(Measurement(name, key, length, "mm", _segment(p0, p1, spacing=spacing)))
    return [h[0] for h in hs]


def _body_heights(name: str, shape: _Shape, o: _Outline, spacing: np.ndarray, measurements: list[Measurement],
                  categories: list[Category], notes: list[str]) -> None:
    keys = (ANTERIOR_BODY_HEIGHT, MIDDLE_BODY_HEIGHT, POSTERIOR_BODY_HEIGHT)
    hs = _three_heights(name, "body", keys, shape, o, spacing, measurements, notes)
    if hs is None:
        return
    ha, hm, hp = hs
    measurements.append(Measurement(name, WEDGE_RATIO, ha / hp, "1", basis="anterior / posterior height"))
    measurements.append(Measurement(name, BICONCAVITY_RATIO, hm / hp, "1", basis="middle / posterior height"))
    loss = 100.0 * (1.0 - min(ha, hm, hp) / max(ha, hm, hp))
    basis = "smallest of anterior, middle, posterior height against the largest of the same body"
    measurements.append(Measurement(name, BODY_HEIGHT_LOSS, loss, "%", basis=basis))
    categories.append(Category(name, GENANT_GRADE, genant_grade(loss),
                               f"height loss {loss:.1f} % ({basis}); Genant et al., J Bone Miner Res 1993;8:1137-48"))


def _canal(name: str, canal: _Shape, o: _Outline, spacing: np.ndarray, measurements: list[Measurement],
           categories: list[Category], notes: list[str]) -> None:
    run = canal.extent(o.centre, o.ap, forward_only=True)
    if run is None:
        notes.append(f"{name}: canal not measurable (no complete canal run behind the disc centre)")
        return
    d = run[1] - run[0]
    pts = _segment(o.centre + run[0] * o.ap, o.centre + run[1] * o.ap, spacing=spacing)
    measurements.append(Measurement(name, CANAL_AP_DIAMETER, d, "mm", pts,
                                    basis="canal extent through the disc centre, parallel to the endplates"))
    categories.append(Category(name, CENTRAL_STENOSIS, stenosis_category(d),
                               f"canal AP diameter {d:.1f} mm; < 10 mm absolute, 10-13 mm relative stenosis "
                               "(Verbiest; Steurer et al., BMC Musculoskelet Disord 2011;12:175)"))


def _slip(upper: str, lower: str, corners: dict[str, dict[str, np.ndarray]], below: _Outline, spacing: np.ndarray,
          measurements: list[Measurement], categories: list[Category]) -> None:
    cu, cl = corners[upper], corners[lower]
    if "IP" not in cu or "SP" not in cl or "SA" not in cl or below.superior is None:
        return
    endplate = float(np.linalg.norm(cl["SP"] - cl["SA"]))
    if endplate <= 0:
        return
    anterior = -_posterior(below.superior, below.ap)
    slip = float((cu["IP"] - cl["SP"]) @ anterior)
    percent = 100.0 * slip / endplate
    level = f"{upper}-{lower}"
    pts = _segment(cl["SP"], cl["SP"] + slip * anterior, spacing=spacing)
    basis = f"{upper} posterior-inferior corner against {lower} posterior-superior corner, along {lower} superior endplate"
    measurements.append(Measurement(level, SLIP, slip, "mm", pts, basis=basis))
    measurements.append(Measurement(level, SLIP_PERCENT, percent, "%", pts,
                                    basis=f"slip over the {lower} superior endplate length ({endplate:.1f} mm)"))
    grade = meyerding_grade(percent)
    direction = "no slip" if grade == "0" else "anterolisthesis" if slip > 0 else "retrolisthesis"
    categories.append(Category(level, MEYERDING_GRADE, grade,
                               f"{direction}: slip {percent:+.1f} % of the {lower} superior endplate (grade 0 below "
                               f"{NO_SLIP_PERCENT:g} %); Meyerding, Surg Gynecol Obstet 1932;54:371-7"))


def _lordosis(bodies: dict[str, _Outline], discs: dict[str, _Outline], corners: dict[str, dict[str, np.ndarray]],
              spacing: np.ndarray, measurements: list[Measurement]) -> None:
    l1 = bodies.get("L1")
    if l1 is None or l1.superior is None:
        return
    s1, s1_corners = bodies.get("S1"), corners.get("S1", {})
    s1_line = s1.superior if s1 is not None else None
    basis = "S1 superior endplate from the S1 body"
    if s1 is None or s1_line is None:
        s1, s1_corners = discs.get("L5-S1"), {}
        s1_line = s1.inferior if s1 is not None else None
        basis = "S1 superior endplate from the inferior border of the L5-S1 disc"
    if s1 is None or s1_line is None:
        return
    e1, e2 = _posterior(l1.superior, l1.ap), _posterior(s1_line, s1.ap)
    # (y down, x posterior): an S1 line rising posteriorly against L1's is a positive (lordotic) angle
    angle = float(np.degrees(np.arctan2(e1[0] * e2[1] - e1[1] * e2[0], e1 @ e2)))
    pts = (*_endplate_segment(l1, l1.superior, corners.get("L1", {})), *_endplate_segment(s1, s1_line, s1_corners))
    measurements.append(Measurement(LORDOSIS_LEVEL, LORDOSIS, angle, "deg", _segment(*pts, spacing=spacing),
                                    basis=f"Cobb angle, L1 superior endplate to {basis}"))


def _endplate_segment(o: _Outline, line: _Line, corners: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A superior endplate line between its corners, or across the structure's AP depth without them."""
    if "SA" in corners and "SP" in corners:
        return corners["SA"], corners["SP"]
    a, p = (line.point + ((o.at(f) - line.point) @ line.direction) * line.direction for f in (0.0, 1.0))
    return a, p
