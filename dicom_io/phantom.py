"""Synthetic lumbar spine phantoms: anatomy, findings and rendering to MR, CT and X-ray.

Everything here is a synthetic phantom built from simple analytic shapes; none of
it is patient data, and written studies say so in their headers (PatientName
``SYNTHETIC^PHANTOM``). The phantoms exist for demonstrations, for tests and as
training material with exact ground truth.

An :class:`Anatomy` is a seeded description of a spine in DICOM patient
coordinates (LPS, mm: +x patient left, +y posterior, +z superior): vertebrae
(T10 ... L5 and S1 with the fused sacrum below it), discs, spinal canal,
foramina, posterior elements and findings per disc level. Renderers evaluate the
anatomy analytically on the output grid of a series (no 3D supersampling), so a
whole MR study renders in about a second.

Findings are placed where their clinical definition puts them:

- disc bulging: circumferential extension of the disc beyond the vertebral margins;
- disc herniation: focal protrusion behind the posterior disc margin, posterolateral on
  ``disc_side`` (centred 0.42 canal widths, 8-12 mm, off the midline, its medial edge at least
  2 mm from it) or central;
- disc degeneration: every bulging or herniated disc is degenerated (dark nucleus on T2, lower
  height); 40% of normal discs have a desiccated nucleus (dark on T2 and STIR, unchanged on T1,
  CT and radiographs, no height loss, as in many asymptomatic people), so that a dark nucleus
  alone does not make a disc abnormal;
- spinal canal stenosis: thecal sac cross-section at the disc reduced by about a
  third to two thirds (moderate) or more than two thirds with CSF obliterated
  (severe);
- neural foraminal narrowing: foraminal fat replaced on that side;
- subarticular stenosis: lateral recess narrowed on that side.

Numpy and scipy only; :mod:`dicom_io.writer` turns a :class:`RenderedSeries` into
DICOM files and :func:`write_demo_study` writes a whole study with its ground truth.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dicom_io.results import DISCS as ALL_DISCS
from dicom_io.results import VERTEBRAE as ALL_VERTEBRAE

#: Changes whenever a seed renders differently (caches of rendered data key on it).
PHANTOM_VERSION = 2
#: Disc levels that get findings by default (the lumbar discs).
LUMBAR_DISCS: tuple[str, ...] = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
DISC_GRADES: tuple[str, ...] = ("normal", "bulging", "herniation")
STENOSIS_GRADES: tuple[str, ...] = ("normal_mild", "moderate", "severe")
XRAY_LABELS: tuple[str, ...] = ("normal", "scoliosis", "spondylolisthesis")
SIDES: tuple[str, ...] = ("L", "R", "C")

#: Thecal sac area kept at the disc level, per canal grade (range drawn per anatomy).
_CANAL_AREA = {"normal_mild": (0.82, 1.0), "moderate": (0.4, 0.6), "severe": (0.1, 0.22)}
#: Fraction of the foraminal fat ellipse kept, per foraminal grade.
_FORAMEN_KEEP = {"normal_mild": (0.9, 1.0), "moderate": (0.55, 0.65), "severe": (0.25, 0.32)}
#: Centre of a lateral herniation from the midline, as a fraction of the canal width.
_HERNIATION_X = 0.42
#: Fraction of normal discs with a desiccated (dark) nucleus.
_DESICCATED = 0.4
#: How far (mm from the midline) the lateral recess is filled, per subarticular grade.
_RECESS_FILL = {"normal_mild": None, "moderate": 0.55, "severe": 0.1}


class Tissue(enum.IntEnum):
    """Tissue labels of a rendered label map (``RenderedSeries.labels``)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    VISCERA = 3
    CORTEX = 4
    MARROW = 5
    ANNULUS = 6
    NUCLEUS = 7
    NUCLEUS_DEGENERATED = 8
    HERNIATION = 9
    CSF = 10
    NERVE = 11
    EPIDURAL_FAT = 12
    LIGAMENT = 13
    VESSEL = 14
    FORAMEN_FAT = 15
    NUCLEUS_DESICCATED = 16  # a normal disc's dry nucleus: dark on T2 and STIR only


# Intensity per tissue and contrast. MR in arbitrary units (0..~1000), CT in HU,
# DX as linear attenuation per mm (for line integrals).
_LUT: dict[str, dict[Tissue, float]] = {
    "T2": {
        Tissue.AIR: 0, Tissue.FAT: 620, Tissue.MUSCLE: 170, Tissue.VISCERA: 300,
        Tissue.CORTEX: 45, Tissue.MARROW: 330, Tissue.ANNULUS: 140, Tissue.NUCLEUS: 820,
        Tissue.NUCLEUS_DEGENERATED: 230, Tissue.HERNIATION: 420, Tissue.CSF: 960,
        Tissue.NERVE: 260, Tissue.EPIDURAL_FAT: 580, Tissue.LIGAMENT: 80, Tissue.VESSEL: 60,
        Tissue.FORAMEN_FAT: 560, Tissue.NUCLEUS_DESICCATED: 230,
    },
    "T1": {
        Tissue.AIR: 0, Tissue.FAT: 880, Tissue.MUSCLE: 300, Tissue.VISCERA: 360,
        Tissue.CORTEX: 45, Tissue.MARROW: 560, Tissue.ANNULUS: 270, Tissue.NUCLEUS: 340,
        Tissue.NUCLEUS_DEGENERATED: 260, Tissue.HERNIATION: 290, Tissue.CSF: 110,
        Tissue.NERVE: 310, Tissue.EPIDURAL_FAT: 820, Tissue.LIGAMENT: 130, Tissue.VESSEL: 80,
        Tissue.FORAMEN_FAT: 830, Tissue.NUCLEUS_DESICCATED: 340,
    },
    "STIR": {
        Tissue.AIR: 0, Tissue.FAT: 70, Tissue.MUSCLE: 150, Tissue.VISCERA: 260,
        Tissue.CORTEX: 30, Tissue.MARROW: 120, Tissue.ANNULUS: 150, Tissue.NUCLEUS: 720,
        Tissue.NUCLEUS_DEGENERATED: 220, Tissue.HERNIATION: 400, Tissue.CSF: 950,
        Tissue.NERVE: 260, Tissue.EPIDURAL_FAT: 90, Tissue.LIGAMENT: 60, Tissue.VESSEL: 50,
        Tissue.FORAMEN_FAT: 90, Tissue.NUCLEUS_DESICCATED: 220,
    },
    "CT": {
        Tissue.AIR: -1000, Tissue.FAT: -100, Tissue.MUSCLE: 50, Tissue.VISCERA: 35,
        Tissue.CORTEX: 1100, Tissue.MARROW: 230, Tissue.ANNULUS: 95, Tissue.NUCLEUS: 75,
        Tissue.NUCLEUS_DEGENERATED: 85, Tissue.HERNIATION: 90, Tissue.CSF: 10,
        Tissue.NERVE: 35, Tissue.EPIDURAL_FAT: -90, Tissue.LIGAMENT: 70, Tissue.VESSEL: 42,
        Tissue.FORAMEN_FAT: -90, Tissue.NUCLEUS_DESICCATED: 75,
    },
}

#: Sequence parameters per MR contrast (what series-selection rules look at).
_MR_PARAMS: dict[str, dict[str, Any]] = {
    "T2": {"RepetitionTime": 4000.0, "EchoTime": 100.0, "ScanningSequence": ["SE"],
           "SequenceVariant": ["SK", "OSP"], "ScanOptions": "", "EchoTrainLength": 17,
           "SequenceName": "*tse2d1_17", "FlipAngle": 150.0},
    "T1": {"RepetitionTime": 550.0, "EchoTime": 10.0, "ScanningSequence": ["SE"],
           "SequenceVariant": ["SK", "OSP"], "ScanOptions": "", "EchoTrainLength": 3,
           "SequenceName": "*tse2d1_3", "FlipAngle": 150.0},
    "STIR": {"RepetitionTime": 3500.0, "EchoTime": 60.0, "InversionTime": 160.0,
             "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "OSP"],
             "ScanOptions": "IR", "EchoTrainLength": 15, "SequenceName": "*tirm2d1_15",
             "FlipAngle": 150.0},
}


# ----------------------------------------------------------------------------- findings


@dataclass
class LevelFindings:
    """Findings at one disc level (e.g. ``"L4-L5"``); defaults mean no finding.

    Parameters
    ----------
    disc : str
        ``normal``, ``bulging`` or ``herniation``.
    disc_side : str
        Side of a herniation: ``L`` (patient left), ``R`` or ``C`` (central).
    canal, foramen_left, foramen_right, subarticular_left, subarticular_right : str
        ``normal_mild``, ``moderate`` or ``severe``.

    Raises
    ------
    ValueError
        If a grade or side is not one of the values above.
    """

    disc: str = "normal"
    disc_side: str = "C"
    canal: str = "normal_mild"
    foramen_left: str = "normal_mild"
    foramen_right: str = "normal_mild"
    subarticular_left: str = "normal_mild"
    subarticular_right: str = "normal_mild"

    def __post_init__(self) -> None:
        if self.disc not in DISC_GRADES:
            raise ValueError(f"disc: {self.disc!r} is not one of {DISC_GRADES}")
        if self.disc_side not in SIDES:
            raise ValueError(f"disc_side: {self.disc_side!r} is not one of {SIDES}")
        for name in ("canal", "foramen_left", "foramen_right", "subarticular_left",
                     "subarticular_right"):
            value = getattr(self, name)
            if value not in STENOSIS_GRADES:
                raise ValueError(f"{name}: {value!r} is not one of {STENOSIS_GRADES}")

    @property
    def is_normal(self) -> bool:
        """True when nothing at this level is abnormal."""
        return self == LevelFindings()


@dataclass
class XrayFindings:
    """Whole-spine finding shown on the radiographs: ``normal``, ``scoliosis`` or ``spondylolisthesis``."""

    label: str = "normal"

    def __post_init__(self) -> None:
        if self.label not in XRAY_LABELS:
            raise ValueError(f"label: {self.label!r} is not one of {XRAY_LABELS}")


def random_findings(
    rng: np.random.Generator,
    discs: tuple[str, ...] = LUMBAR_DISCS,
    p_abnormal: float = 0.5,
) -> dict[str, LevelFindings]:
    """Draw findings for ``discs``; each level is abnormal with probability ``p_abnormal``.

    An abnormal level gets one to three abnormal conditions at random grades; lower
    discs are not favoured, so every grade appears at every level.

    Raises
    ------
    ValueError
        If a disc name is unknown or ``p_abnormal`` is outside [0, 1].
    """
    if not 0.0 <= p_abnormal <= 1.0:
        raise ValueError(f"p_abnormal: must be in [0, 1], got {p_abnormal!r}")
    out: dict[str, LevelFindings] = {}
    for disc in discs:
        if disc not in ALL_DISCS:
            raise ValueError(f"discs: unknown disc {disc!r}; known: {', '.join(ALL_DISCS)}")
        f = LevelFindings()
        if rng.random() < p_abnormal:
            conditions = ["disc", "canal", "foramen_left", "foramen_right",
                          "subarticular_left", "subarticular_right"]
            picked = rng.choice(len(conditions), size=int(rng.integers(1, 4)), replace=False)
            for i in picked:
                name = conditions[int(i)]
                if name == "disc":
                    f.disc = str(rng.choice(DISC_GRADES[1:]))
                    f.disc_side = str(rng.choice(SIDES))
                else:
                    setattr(f, name, str(rng.choice(STENOSIS_GRADES[1:])))
        out[disc] = f
    return out


# ----------------------------------------------------------------------------- anatomy


@dataclass
class Vertebra:
    """One vertebral body with its arch, in patient mm.

    ``frame`` columns are the local left, posterior and cranial unit vectors;
    ``centroid`` is the body centre, the endplate centres lie on the local axis.
    """

    name: str
    centroid: np.ndarray
    superior_endplate: np.ndarray
    inferior_endplate: np.ndarray
    frame: np.ndarray
    height: float
    width: float
    depth: float
    canal_width: float
    canal_depth: float
    spinous_length: float
    transverse_length: float


@dataclass
class Disc:
    """One intervertebral disc: centre between the neighbouring endplate centres."""

    name: str
    centre: np.ndarray
    frame: np.ndarray
    height: float
    width: float
    depth: float
    wedge: float  # tan of the lordotic wedge angle (anterior taller)
    degeneration: float  # 0 healthy .. 1 fully degenerated (dark, flat)
    canal_width: float
    canal_depth: float
    findings: LevelFindings
    # Drawn amounts for the findings (so rendering needs no random numbers).
    canal_area: float = 1.0
    foramen_keep: tuple[float, float] = (1.0, 1.0)  # left, right
    bulge_mm: float = 0.0
    herniation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # radii x, y, z
    desiccated: bool = False  # dry nucleus, dark on T2/STIR only, full height (normal discs only)

    @property
    def dark_nucleus(self) -> bool:
        """Whether the nucleus is dark on T2 (degenerated or desiccated)."""
        return self.degeneration > 0.5 or self.desiccated

    @property
    def nucleus(self) -> Tissue:
        """The nucleus's label."""
        if self.degeneration > 0.5:
            return Tissue.NUCLEUS_DEGENERATED
        return Tissue.NUCLEUS_DESICCATED if self.desiccated else Tissue.NUCLEUS


@dataclass
class Anatomy:
    """A seeded synthetic lumbar spine in patient coordinates (LPS, mm).

    Build with :func:`make_anatomy`. ``vertebrae`` and ``discs`` are ordered
    cranial to caudal; ``sacrum`` holds the fused S2-S4 segments below S1.
    """

    seed: int
    vertebrae: dict[str, Vertebra]
    discs: dict[str, Disc]
    sacrum: list[Vertebra]
    findings: dict[str, LevelFindings]
    xray: XrayFindings
    trunk: dict[str, float]
    variation: dict[str, Any]
    top: str = "T12"
    overrides: dict[str, Any] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def levels_mm(self) -> dict[str, list[float]]:
        """Vertebral centroids and disc centres by level name (LPS mm)."""
        out = {n: v.centroid.tolist() for n, v in self.vertebrae.items()}
        out.update({n: d.centre.tolist() for n, d in self.discs.items()})
        return out

    def midline_x(self) -> float:
        """Mean left-right position of the lumbar bodies (mm)."""
        return float(np.mean([v.centroid[0] for v in self.vertebrae.values()]))


_VARIATION_KEYS = {
    "sacral_slope_deg", "lordosis_deg", "vertebra_height_mm", "disc_height_mm",
    "body_width_mm", "body_depth_mm", "canal_width_mm", "canal_depth_mm", "rotation_deg",
    "offset_mm", "scoliosis_mm", "slip_mm", "slip_level", "xray", "subcutaneous_fat_mm",
}


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, y, z, applied in that order."""
    ax, ay, az = np.radians([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    my = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    mz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return mz @ my @ mx


def _frame(axis: np.ndarray) -> np.ndarray:
    """Local frame (columns: left, posterior, cranial) around a cranial ``axis``."""
    z = axis / np.linalg.norm(axis)
    x = np.array([1.0, 0.0, 0.0]) - z[0] * z
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


def make_anatomy(
    seed: int,
    findings: dict[str, LevelFindings] | None = None,
    top: str = "T12",
    **variation: Any,
) -> Anatomy:
    """Build a random but plausible lumbar spine for ``seed``.

    Parameters
    ----------
    seed : int
        Seeds every random choice; the same arguments give the same anatomy.
    findings : dict of str to LevelFindings, optional
        Findings per disc level; levels not given are normal.
    top : str
        Most cranial vertebra (``T10``, ``T11``, ``T12`` or ``L1``).
    **variation
        Overrides of the drawn variation: ``sacral_slope_deg`` (28-40),
        ``lordosis_deg`` (L1-S1, 30-50), ``vertebra_height_mm`` (L3 body, 25-35),
        ``disc_height_mm`` (8-12), ``body_width_mm`` (40-50), ``body_depth_mm``
        (27-33), ``canal_width_mm`` (20-26), ``canal_depth_mm`` (14-18),
        ``rotation_deg`` (3 angles about x, y, z, a few degrees), ``offset_mm``
        (3 values: patient position), ``scoliosis_mm`` (lateral deviation at the
        apex), ``slip_mm`` and ``slip_level`` (anterior slip of ``L4`` or ``L5``),
        ``subcutaneous_fat_mm`` and ``xray`` (an :class:`XrayFindings`; scoliosis
        and spondylolisthesis set the curve or slip when not given).

    Raises
    ------
    TypeError
        If a variation key is unknown.
    ValueError
        If ``top``, a disc name in ``findings`` or ``slip_level`` is invalid.
    """
    unknown = set(variation) - _VARIATION_KEYS
    if unknown:
        raise TypeError(f"variation: unknown keys {sorted(unknown)}; known: {sorted(_VARIATION_KEYS)}")
    if top not in ("T10", "T11", "T12", "L1"):
        raise ValueError(f"top: must be T10, T11, T12 or L1, got {top!r}")
    names = list(ALL_VERTEBRAE[ALL_VERTEBRAE.index(top):])  # ... L5, S1
    disc_names = [f"{a}-{b}" for a, b in zip(names[:-1], names[1:])]
    findings = dict(findings or {})
    for k, v in findings.items():
        if k not in disc_names:
            raise ValueError(f"findings: {k!r} is not a disc of this anatomy ({', '.join(disc_names)})")
        if not isinstance(v, LevelFindings):
            raise TypeError(f"findings[{k!r}]: expected LevelFindings, got {type(v).__name__}")
    for k in disc_names:
        findings.setdefault(k, LevelFindings())
    xray = variation.get("xray") or XrayFindings()
    if not isinstance(xray, XrayFindings):
        raise TypeError(f"xray: expected XrayFindings, got {type(xray).__name__}")

    rng = np.random.default_rng([int(seed), 0x5B1E])

    # Every draw happens whatever is overridden, so an override changes only its own value.
    def pick(key: str, lo: float, hi: float) -> float:
        drawn = float(rng.uniform(lo, hi))
        return float(variation[key]) if key in variation else drawn

    sacral_slope = pick("sacral_slope_deg", 28.0, 40.0)
    lordosis = pick("lordosis_deg", 30.0, 50.0)
    h_ref = pick("vertebra_height_mm", 25.0, 32.0)
    d_ref = pick("disc_height_mm", 8.0, 12.0)
    w_ref = pick("body_width_mm", 40.0, 50.0)
    dp_ref = pick("body_depth_mm", 27.0, 33.0)
    cw_ref = pick("canal_width_mm", 20.0, 26.0)
    cd_ref = pick("canal_depth_mm", 14.0, 18.0)
    rot = rng.uniform(-3.0, 3.0, 3)
    rot = np.asarray(variation.get("rotation_deg", rot), float)
    off = rng.uniform([-15, -10, -20], [15, 10, 20])
    off = np.asarray(variation.get("offset_mm", off), float)
    if rot.shape != (3,) or off.shape != (3,):
        raise ValueError(f"rotation_deg/offset_mm: expected 3 values each, got {rot.shape}, {off.shape}")
    scol_curve = float(rng.uniform(14.0, 26.0)) * float(rng.choice([-1.0, 1.0]))
    scol_small = float(rng.uniform(-2.0, 2.0))
    scoliosis = float(variation.get("scoliosis_mm", scol_curve if xray.label == "scoliosis" else scol_small))
    slip_drawn = float(rng.uniform(7.0, 12.0))
    slip = float(variation.get("slip_mm", slip_drawn if xray.label == "spondylolisthesis" else 0.0))
    level_drawn = str(rng.choice(["L4", "L5"]))
    slip_level = variation.get("slip_level", level_drawn)
    if slip_level not in ("L4", "L5"):
        raise ValueError(f"slip_level: must be 'L4' or 'L5', got {slip_level!r}")
    fat = pick("subcutaneous_fat_mm", 12.0, 35.0)
    # Everything below draws per level, in a fixed order.
    rng = np.random.default_rng([int(seed), 0x5B1F])

    # Tilt of each segment's cranial axis from +z towards anterior (deg): S1 follows the
    # sacral slope, and the lordosis unwinds towards L1, then a slight kyphosis above.
    lumbar = ["L1", "L2", "L3", "L4", "L5", "S1"]
    tilt: dict[str, float] = {}
    for i, n in enumerate(lumbar):
        frac = i / 5.0
        tilt[n] = sacral_slope - lordosis * (1.0 - frac) ** 0.6
    for i, n in enumerate(["T12", "T11", "T10"]):
        tilt[n] = tilt["L1"] - 3.0 * (i + 1) * rng.uniform(0.7, 1.3)
    # Relative size per level (lumbar bodies grow caudally).
    size = {"T10": 0.84, "T11": 0.88, "T12": 0.92, "L1": 0.95, "L2": 0.98, "L3": 1.0,
            "L4": 1.01, "L5": 0.98, "S1": 1.0}
    disc_size = {"T10": 0.65, "T11": 0.7, "T12": 0.78, "L1": 0.88, "L2": 0.95, "L3": 1.0,
                 "L4": 1.05, "L5": 0.95}

    def axis_of(t_deg: float) -> np.ndarray:
        t = math.radians(t_deg)
        return np.array([0.0, -math.sin(t), math.cos(t)])

    # Build from S1 upwards in a canonical frame (S1 superior endplate at origin).
    vert: dict[str, dict] = {}
    discs_raw: dict[str, dict] = {}
    a_s1 = axis_of(tilt["S1"])
    h_s1 = h_ref * 1.0 * rng.uniform(0.95, 1.05)
    vert["S1"] = {"sup": np.zeros(3), "axis": a_s1, "h": h_s1,
                  "inf": -a_s1 * h_s1, "c": -a_s1 * h_s1 / 2.0}
    end = np.zeros(3)
    for upper, lower in reversed(list(zip(names[:-1], names[1:]))):
        a_v = axis_of(tilt[upper])
        a_lower = vert[lower]["axis"]
        a_d = (a_v + a_lower) / np.linalg.norm(a_v + a_lower)
        dn = f"{upper}-{lower}"
        degen = float(rng.uniform(0.0, 0.25))
        if findings[dn].disc != "normal":
            degen = float(rng.uniform(0.55, 1.0))
        elif rng.random() < 0.15:
            degen = float(rng.uniform(0.3, 0.7))
        hd = d_ref * disc_size[upper] * rng.uniform(0.9, 1.1) * (1.0 - 0.35 * degen)
        discs_raw[dn] = {"c": end + a_d * hd / 2.0, "axis": a_d, "h": hd, "degen": degen,
                         "wedge": math.tan(math.radians(abs(tilt[lower] - tilt[upper]) * 0.8))}
        inf = end + a_d * hd
        hv = h_ref * size[upper] * rng.uniform(0.94, 1.06)
        vert[upper] = {"inf": inf, "axis": a_v, "h": hv, "c": inf + a_v * hv / 2.0,
                       "sup": inf + a_v * hv}
        end = vert[upper]["sup"]

    # Spondylolisthesis: the slipped vertebra and everything above move anteriorly.
    if slip > 0:
        moved = names[: names.index(slip_level) + 1]
        shift = np.array([0.0, -slip, 0.0])
        for n in moved:
            for k in ("c", "sup", "inf"):
                vert[n][k] = vert[n][k] + shift
        for dn in list(discs_raw):
            up, lo = dn.split("-")
            if up in moved and lo in moved:
                discs_raw[dn]["c"] = discs_raw[dn]["c"] + shift
            elif up in moved:
                discs_raw[dn]["c"] = discs_raw[dn]["c"] + shift / 2.0

    # Lateral curve (scoliosis or a little asymmetry): x offset as a smooth bump over
    # the lumbar column, apex near L2-L3; axes tilt with the curve's slope.
    z_s1 = 0.0
    z_top = vert[names[0]]["sup"][2]
    span = max(z_top - z_s1, 1.0)

    def lateral(z: float) -> tuple[float, float]:
        u = np.clip((z - z_s1) / span, 0.0, 1.0)
        return scoliosis * math.sin(math.pi * u), scoliosis * math.pi / span * math.cos(math.pi * u)

    def bend(p: np.ndarray, axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, slope = lateral(float(p[2]))
        a = axis + np.array([slope * axis[2], 0.0, 0.0])
        return p + np.array([dx, 0.0, 0.0]), a / np.linalg.norm(a)

    # Global pose: small rotation about the L3 centroid, then the patient offset.
    rmat = _rotation(*rot)
    pivot = vert["L3"]["c"].copy() if "L3" in vert else np.zeros(3)

    def place(p: np.ndarray) -> np.ndarray:
        return rmat @ (p - pivot) + off

    vertebrae: dict[str, Vertebra] = {}
    for n in names:
        v = vert[n]
        c, a = bend(v["c"], v["axis"])
        sup, _ = bend(v["sup"], v["axis"])
        inf, _ = bend(v["inf"], v["axis"])
        s = size[n]
        w = w_ref * s * rng.uniform(0.96, 1.04) * (1.12 if n == "S1" else 1.0)
        dp = dp_ref * s * rng.uniform(0.96, 1.04)
        thoracic = n.startswith("T")
        vertebrae[n] = Vertebra(
            name=n, centroid=place(c), superior_endplate=place(sup), inferior_endplate=place(inf),
            frame=rmat @ _frame(a), height=v["h"], width=w, depth=dp,
            canal_width=cw_ref * (0.85 if thoracic else 1.0) * rng.uniform(0.95, 1.05),
            canal_depth=cd_ref * rng.uniform(0.95, 1.05) * (0.9 if n == "S1" else 1.0),
            spinous_length=(32.0 if thoracic else 26.0) * rng.uniform(0.85, 1.15),
            transverse_length=(14.0 if thoracic else {"L3": 28.0, "L4": 24.0, "L5": 20.0}.get(n, 22.0))
            * rng.uniform(0.85, 1.15),
        )

    discs: dict[str, Disc] = {}
    # Desiccated normal discs come from their own stream (one draw per disc, whatever the
    # findings), so the rest of the anatomy is what the main stream makes of the seed.
    dry = np.random.default_rng([int(seed), 0xD15C]).random(len(disc_names)) < _DESICCATED
    for k_disc, dn in enumerate(disc_names):
        up, lo = dn.split("-")
        raw = discs_raw[dn]
        va, vb = vertebrae[up], vertebrae[lo]
        centre = (va.inferior_endplate + vb.superior_endplate) / 2.0
        axis = va.inferior_endplate - vb.superior_endplate
        f = findings[dn]
        keep = tuple(float(rng.uniform(*_FORAMEN_KEEP[g])) for g in (f.foramen_left, f.foramen_right))
        herniation = (0.0, 0.0, 0.0)
        if f.disc == "herniation":
            herniation = (float(rng.uniform(3.8, 5.5)), float(rng.uniform(4.0, 5.5)),
                          float(rng.uniform(4.0, 6.0)))
        discs[dn] = Disc(
            name=dn, centre=centre, frame=rmat @ _frame(rmat.T @ axis / np.linalg.norm(axis)),
            height=float(np.linalg.norm(axis)), width=(va.width + vb.width) / 2.0 * 0.98,
            depth=(va.depth + vb.depth) / 2.0, wedge=raw["wedge"], degeneration=raw["degen"],
            canal_width=(va.canal_width + vb.canal_width) / 2.0,
            canal_depth=(va.canal_depth + vb.canal_depth) / 2.0, findings=f,
            canal_area=float(rng.uniform(*_CANAL_AREA[f.canal])), foramen_keep=keep,  # type: ignore[arg-type]
            bulge_mm=float(rng.uniform(2.5, 4.0)) if f.disc == "bulging" else 0.0,
            herniation_mm=herniation, desiccated=bool(f.disc == "normal" and dry[k_disc]),
        )

    # Fused sacral segments S2-S4 continue below S1 with a kyphotic curve.
    sacrum: list[Vertebra] = []
    s1 = vert["S1"]
    prev_inf, t_prev = s1["inf"], tilt["S1"]
    for k, (hs, ws) in enumerate([(0.8, 0.85), (0.65, 0.65), (0.5, 0.45)]):
        t = t_prev + 10.0
        a = axis_of(t)
        hh = h_s1 * hs
        sup = prev_inf - a * 1.5
        c = sup - a * hh / 2.0
        inf = sup - a * hh
        cb, ab = bend(c, a)
        sacrum.append(Vertebra(
            name=f"S{k + 2}", centroid=place(cb), superior_endplate=place(bend(sup, a)[0]),
            inferior_endplate=place(bend(inf, a)[0]), frame=rmat @ _frame(ab), height=hh,
            width=vertebrae["S1"].width * ws, depth=vertebrae["S1"].depth * (0.9 - 0.12 * k),
            canal_width=vertebrae["S1"].canal_width * (0.8 - 0.15 * k),
            canal_depth=vertebrae["S1"].canal_depth * (0.6 - 0.1 * k),
            spinous_length=8.0, transverse_length=0.0,
        ))
        prev_inf, t_prev = inf, t

    # Trunk: an elliptic body outline, fixed along z, behind which the back muscles lie.
    tips = [v.centroid + v.frame[:, 1] * (v.depth / 2 + v.canal_depth + v.spinous_length + 4)
            for v in vertebrae.values()]
    y_back = max(float(t[1]) for t in tips) + fat + float(rng.uniform(3.0, 8.0))
    semi_ap = float(rng.uniform(100.0, 130.0))
    trunk = {"x": float(off[0]), "y": y_back - semi_ap, "a": float(rng.uniform(140.0, 175.0)),
             "b": semi_ap, "fat": fat}

    used = {"sacral_slope_deg": sacral_slope, "lordosis_deg": lordosis, "vertebra_height_mm": h_ref,
            "disc_height_mm": d_ref, "body_width_mm": w_ref, "body_depth_mm": dp_ref,
            "canal_width_mm": cw_ref, "canal_depth_mm": cd_ref, "rotation_deg": [float(r) for r in rot],
            "offset_mm": [float(o) for o in off], "scoliosis_mm": scoliosis, "slip_mm": slip,
            "slip_level": slip_level, "subcutaneous_fat_mm": fat}
    return Anatomy(seed=int(seed), vertebrae=vertebrae, discs=discs, sacrum=sacrum,
                   findings=findings, xray=xray, trunk=trunk, variation=used, top=top,
                   overrides=dict(variation))


# ----------------------------------------------------------------------------- painting


class _Grid:
    """An output grid (slices, rows, columns) with its voxel -> patient affine."""

    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray) -> None:
        self.shape = shape
        self.affine = np.asarray(affine, float)
        self.inv = np.linalg.inv(self.affine)
        self.labels = np.zeros(shape, np.uint8)

    def block(self, origin: np.ndarray, frame: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """Voxel block covering the local box [lo, hi], and local coordinates on it.

        Returns ``(index, (x, y, z))`` with local coordinates (float32, broadcast to
        the block's shape) in the frame at ``origin``; ``index`` is None when the
        box misses the grid.
        """
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                            for c in (lo[2], hi[2])])
        pts = origin[None, :] + corners @ frame.T
        vox = (self.inv[:3, :3] @ pts.T).T + self.inv[:3, 3]  # (column, row, slice)
        mn = np.floor(vox.min(axis=0)).astype(int)
        mx = np.ceil(vox.max(axis=0)).astype(int) + 1
        s0, s1 = max(mn[2], 0), min(mx[2], self.shape[0])
        r0, r1 = max(mn[1], 0), min(mx[1], self.shape[1])
        c0, c1 = max(mn[0], 0), min(mx[0], self.shape[2])
        if s0 >= s1 or r0 >= r1 or c0 >= c1:
            return None, None
        m = frame.T @ self.affine[:3, :3]  # local = m @ (c, r, s) + b
        b = frame.T @ (self.affine[:3, 3] - origin)
        cc = np.arange(c0, c1, dtype=np.float32)[None, None, :]
        rr = np.arange(r0, r1, dtype=np.float32)[None, :, None]
        ss = np.arange(s0, s1, dtype=np.float32)[:, None, None]
        local = tuple((m[i, 0] * cc + m[i, 1] * rr + m[i, 2] * ss + b[i]).astype(np.float32)
                      for i in range(3))
        shape = (s1 - s0, r1 - r0, c1 - c0)
        local = tuple(np.broadcast_to(a, shape) for a in local)
        return (slice(s0, s1), slice(r0, r1), slice(c0, c1)), local

    def patient(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient coordinates of every voxel (float32, broadcastable)."""
        return self.block(np.zeros(3), np.eye(3), *self._whole())[1]

    def _whole(self) -> tuple[np.ndarray, np.ndarray]:
        s, r, c = self.shape
        corners = np.array([[a, b, d, 1.0] for a in (0, c - 1) for b in (0, r - 1) for d in (0, s - 1)])
        pts = (self.affine @ corners.T).T[:, :3]
        return pts.min(axis=0) - 1.0, pts.max(axis=0) + 1.0


def _sq(a: np.ndarray, s: float) -> np.ndarray:
    return (a / s) ** 2


def _paint_trunk(g: _Grid, anat: Anatomy) -> None:
    """Body outline, subcutaneous fat, viscera, back muscles, psoas and great vessels."""
    x, y, z = g.patient()
    t = anat.trunk
    # Spine centreline as a function of z (lumbar bodies, S1 and sacrum).
    segs = list(anat.vertebrae.values()) + anat.sacrum
    zs = np.array([v.centroid[2] for v in segs])
    order = np.argsort(zs)
    zs = zs[order]
    cx = np.array([v.centroid[0] for v in segs])[order]
    cy = np.array([v.centroid[1] for v in segs])[order]
    half_d = np.array([v.depth / 2 for v in segs])[order]
    canal = np.array([v.canal_depth for v in segs])[order]
    half_w = np.array([v.width / 2 for v in segs])[order]
    zz = z[:, :, :] if z.ndim == 3 else z
    sx = np.interp(zz, zs, cx).astype(np.float32)
    sy = np.interp(zz, zs, cy).astype(np.float32)
    hd = np.interp(zz, zs, half_d).astype(np.float32)
    cd = np.interp(zz, zs, canal).astype(np.float32)
    hw = np.interp(zz, zs, half_w).astype(np.float32)
    r_out = _sq(x - t["x"], t["a"]) + _sq(y - t["y"], t["b"])
    r_in = _sq(x - t["x"], t["a"] - t["fat"]) + _sq(y - t["y"], t["b"] - t["fat"])
    lab = np.where(r_out <= 1.0, np.uint8(Tissue.FAT), np.uint8(Tissue.AIR))
    inner = r_in <= 1.0
    lab[inner] = Tissue.VISCERA
    dx = x - sx
    dy = y - sy
    # Erector spinae and multifidus: behind the arch, beside the spinous processes.
    back = inner & (_sq(np.abs(dx) - 25.0, 27.0) + _sq(dy - hd - cd - 20.0, 29.0) <= 1.0) & (
        dy > hd + cd * 0.5)
    lab[back] = Tissue.MUSCLE
    # A thin fat plane between the two muscle masses, behind the spinous tips.
    lab[back & (np.abs(dx) < 1.0) & (dy > hd + cd + 32.0)] = Tissue.FAT
    # Psoas grows from L1 down to L5; quadratus lumborum lateral to the transverse processes.
    l1z = anat.vertebrae["L1"].centroid[2] if "L1" in anat.vertebrae else zs[-1]
    l5z = anat.vertebrae["L5"].centroid[2]
    frac = np.clip((l1z - zz) / max(l1z - l5z, 1.0), 0.0, 1.0)
    pr = 7.0 + 11.0 * frac
    for side in (1.0, -1.0):
        px = side * (hw + 2.0 + pr * 0.8)
        psoas = inner & (_sq(dx - px, pr) + _sq(dy + 4.0, pr * 0.85) <= 1.0) & (zz < l1z + 20.0)
        lab[psoas] = Tissue.MUSCLE
        ql = inner & (_sq(dx - side * 62.0, 14.0) + _sq(dy - hd - 8.0, 9.0) <= 1.0) & (zz > l5z)
        lab[ql] = Tissue.MUSCLE
    # Aorta (left) and inferior vena cava (right) in front of the bodies, above L4.
    l4z = anat.vertebrae["L4"].centroid[2]
    above = zz > l4z
    aorta = above & (_sq(dx - 12.0, 10.0) + _sq(dy + hd + 13.0, 10.0) <= 1.0)
    ivc = above & (_sq(dx + 16.0, 12.0) + _sq(dy + hd + 11.0, 8.0) <= 1.0)
    below = ~above & (zz > l5z - 30.0)
    iliac = below & ((_sq(np.abs(dx) - 24.0, 6.0) + _sq(dy + hd + 8.0, 6.0)) <= 1.0)
    lab[inner & (aorta | ivc | iliac)] = Tissue.VESSEL
    g.labels[...] = lab


def _body_r(x: np.ndarray, y: np.ndarray, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Superellipse radius of a vertebral body section: rounder in front, flat at the back."""
    ax = np.abs(x) / a
    yy = y / b
    y2 = yy * yy
    # Exponents 2.5 / 2 / 4 as products: fractional powers dominate the paint time.
    return ax * ax * np.sqrt(ax) + np.where(yy < 0, y2, y2 * y2)


def _paint_canal(g: _Grid, origin: np.ndarray, frame: np.ndarray, depth: float, cw: float,
                 cd: float, z_half: float, cord: float, disc: Disc | None = None) -> None:
    """Spinal canal tube: epidural fat, thecal sac with CSF, cord or cauda equina.

    With ``disc`` given, the stenoses of that disc are applied around its centre.
    ``cord`` scales the spinal cord (1 above the conus, 0 in the cauda equina).
    """
    yc = depth / 2 + 1.0 + cd / 2
    ca, cb = cw / 2, cd / 2
    lo = np.array([-ca - 1, -depth / 2, -z_half])
    hi = np.array([ca + 1, yc + cb + 1, z_half])
    idx, loc = g.block(origin, frame, lo, hi)
    if idx is None:
        return
    x, y, z = loc
    lab = g.labels[idx]
    canal = (_sq(x, ca) + _sq(y - yc, cb) <= 1.0) & (np.abs(z) <= z_half)
    sa, sb, sy = ca - 2.5, cb - 2.2, yc - 0.4
    k = np.ones_like(x)
    w = np.zeros_like(x)
    if disc is not None:
        # Weight of the disc-level effects: full over the disc, fading over 6 mm.
        hz = disc.height / 2
        w = np.clip(1.0 - (np.abs(z) - hz) / 6.0, 0.0, 1.0)
        w = (0.5 - 0.5 * np.cos(np.pi * w)).astype(np.float32)
        k = 1.0 - (1.0 - math.sqrt(disc.canal_area)) * w
    sac0 = canal & (_sq(x, sa) + _sq(y - sy, sb) <= 1.0)
    # The sac shrinks towards its posterior-central part (disc in front, ligamenta behind).
    sac = canal & (_sq(x, sa * k) + _sq(y - (sy + sb * (1 - k) * 0.25), sb * k) <= 1.0)
    lab[canal] = Tissue.EPIDURAL_FAT
    lab[sac0 & ~sac & (y < sy)] = Tissue.ANNULUS
    lab[sac0 & ~sac & (y >= sy)] = Tissue.LIGAMENT
    lab[sac] = Tissue.CSF
    if cord > 0:
        lab[sac & (_sq(x, 4.2 * cord) + _sq(y - sy, 3.2 * cord) <= 1.0)] = Tissue.NERVE
    else:
        # Cauda equina: roots lie dependent (posterior) in the sac.
        for rx, ry in ((-3.5, 2.0), (-1.2, 3.2), (1.2, 3.2), (3.5, 2.0), (-5.5, 0.5), (5.5, 0.5),
                       (0.0, 1.0), (-2.3, -0.5), (2.3, -0.5)):
            lab[sac & (_sq(x - rx * k, 0.9) + _sq(y - sy - ry * k, 0.9) <= 1.0)] = Tissue.NERVE
    # Traversing roots in the lateral recesses.
    for side in (1.0, -1.0):
        lab[canal & (_sq(x - side * (sa + 1.2), 1.4) + _sq(y - (yc - cb * 0.45), 1.4) <= 1.0)] = Tissue.NERVE
    if disc is not None:
        # Ligamenta flava: a dark band along the posterior canal wall at the disc level.
        flavum = canal & ~sac & (y > yc) & (_sq(x, ca - 2.5) + _sq(y - yc, cb - 2.5) > 1.0) & (w > 0.3)
        lab[flavum] = Tissue.LIGAMENT
        if disc.canal_area < 0.3:
            lab[sac & (w > 0.5)] = Tissue.NERVE  # CSF obliterated: crowded roots only
        f = disc.findings
        for side, grade in ((1.0, f.subarticular_left), (-1.0, f.subarticular_right)):
            fill = _RECESS_FILL[grade]
            if fill is None:
                continue
            # Facet and ligamentum flavum hypertrophy fill the lateral recess on that side.
            xt = sa * fill
            recess = canal & (side * x > xt + (1.0 - w) * ca) & (y < yc + cb * 0.5)
            lab[recess] = Tissue.LIGAMENT
    g.labels[idx] = lab


def _paint_disc(g: _Grid, d: Disc) -> None:
    """Annulus, nucleus, bulge or herniation, and both neural foramina of one disc."""
    a, b = d.width / 2, d.depth / 2
    bulge = d.bulge_mm
    hx, hy, hz = d.herniation_mm
    lo = np.array([-a - bulge - 26.0, -b - bulge - 3.0, -d.height / 2 - 14.0])
    hi = np.array([a + bulge + 26.0, b + d.canal_depth + 6.0, d.height / 2 + 18.0])
    idx, loc = g.block(d.centre, d.frame, lo, hi)
    if idx is None:
        return
    x, y, z = loc
    lab = g.labels[idx]
    hgt = np.maximum(d.height + d.wedge * (-y), 2.0)  # taller anteriorly (lordotic wedge)
    r = _body_r(x, y, a, b)
    disc = (r <= 1.0) & (np.abs(z) <= hgt / 2 + 1.5)
    if bulge > 0:
        rb = _body_r(x, y, a + bulge, b + bulge)
        disc |= (rb <= 1.0) & (np.abs(z) <= hgt / 2 * 0.85)
    lab[disc] = Tissue.ANNULUS
    nuc = disc & (_sq(x, a * 0.62) + _sq(y - 1.0, b * 0.6) <= 1.0) & (np.abs(z) <= hgt * 0.36)
    lab[nuc] = d.nucleus
    if hx > 0:
        side = {"L": 1.0, "R": -1.0, "C": 0.0}[d.findings.disc_side]
        herniation = (_sq(x - side * _HERNIATION_X * d.canal_width, hx) + _sq(y - (b + 1.0), hy + 1.0)
                      + _sq(z + 0.5, hz) <= 1.0) & (y > 0)
        lab[herniation] = Tissue.HERNIATION
    # Neural foramina: teardrop of fat between the pedicles, root in its upper part.
    fy, fz, fa, fb = b + 4.5, 4.5, 5.0, 10.0
    for side, keep in ((1.0, d.foramen_keep[0]), (-1.0, d.foramen_keep[1])):
        xs = side * x
        lateral = (xs >= d.canal_width / 2 + 1.0) & (xs <= d.canal_width / 2 + 12.0)
        taper = 1.0 - 0.35 * np.clip((z - fz) / fb, -1.0, 1.0)  # wider at the top
        foramen = lateral & (_sq(y - fy, fa * (1.25 - 0.25 * taper)) + _sq(z - fz, fb) <= 1.0)
        foramen &= ~disc
        lab[foramen] = Tissue.LIGAMENT
        fat_cz = fz + (1.0 - keep) * fb * 0.55
        fat = foramen & (_sq(y - fy, fa * keep) + _sq(z - fat_cz, fb * keep) <= 1.0)
        lab[fat] = Tissue.FORAMEN_FAT
        root_r = 2.6 if keep > 0.5 else 2.0
        lab[foramen & (_sq(y - (fy - 0.5), root_r) + _sq(z - (fz + 5.0), root_r * 1.2) <= 1.0)] = Tissue.NERVE
    g.labels[idx] = lab


def _paint_vertebra(g: _Grid, v: Vertebra, s1: bool = False) -> None:
    """Vertebral body (cortex and marrow) and the neural arch of one vertebra."""
    a, b, hh = v.width / 2, v.depth / 2, v.height / 2
    yc = b + 1.0 + v.canal_depth / 2
    ca, cb = v.canal_width / 2, v.canal_depth / 2
    reach = ca + 8.0 + v.transverse_length
    if s1:
        reach = max(reach, a + 40.0)
    lo = np.array([-reach, -b - 2.0, -hh - 16.0])
    hi = np.array([reach, yc + cb + v.spinous_length + 10.0, hh + 16.0])
    idx, loc = g.block(v.centroid, v.frame, lo, hi)
    if idx is None:
        return
    x, y, z = loc
    lab = g.labels[idx]
    az = np.abs(z)
    # Body: concave waist, slightly concave endplates, 1.5 mm cortical shell.
    waist = 1.0 - 0.06 * (1.0 - (z / hh) ** 2)
    r = _body_r(x, y, a * waist, b * waist)
    lim = hh - 0.8 * (1.0 - np.clip(r, 0.0, 1.0))
    body = (r <= 1.0) & (az <= lim)
    r_in = _body_r(x, y, a * waist - 1.5, b * waist - 1.5)
    marrow = (r_in <= 1.0) & (az <= lim - 1.2)
    bone = body.copy()
    marrow_m = marrow.copy()

    def add(mask: np.ndarray, inner: np.ndarray | None = None) -> None:
        bone[...] |= mask
        if inner is not None:
            marrow_m[...] |= inner

    # Pedicles: from the back of the body to the middle of the canal, upper half of the body.
    pz, ph = 0.2 * v.height, 0.3 * v.height
    for side in (1.0, -1.0):
        px = side * (ca + 3.5)
        ped = (_sq(x - px, 4.2) + _sq(z - pz, ph) <= 1.0) & (y >= b - 3.0) & (y <= yc + 2.0)
        ped_in = (_sq(x - px, 2.6) + _sq(z - pz, ph - 1.5) <= 1.0) & (y >= b - 2.0) & (y <= yc + 1.0)
        add(ped, inner=ped_in)
    # Laminae: the posterior half of a ring around the canal.
    rc = _sq(x, ca) + _sq(y - yc, cb)
    lam_z = (z >= -hh - 4.0) & (z <= 0.35 * v.height)
    lam = (rc > 1.0) & (_sq(x, ca + 6.0) + _sq(y - yc, cb + 5.5) <= 1.0) & (y >= yc - 1.0) & lam_z
    lam_in = (_sq(x, ca + 4.5) + _sq(y - yc, cb + 4.0) <= 1.0) & (rc > 1.35) & (y >= yc) & lam_z
    add(lam, inner=lam_in)
    # Articular processes: superior ones lateral, reaching up past the disc; inferior ones
    # medial-posterior, reaching down; the gap between them is the facet joint.
    for side in (1.0, -1.0):
        sap = (_sq(x - side * (ca + 4.5), 3.8) + _sq(y - (yc + cb * 0.55), 4.5) <= 1.0) & (
            z >= 0.15 * v.height) & (z <= hh + 9.0)
        iap = (_sq(x - side * (ca + 0.5), 3.6) + _sq(y - (yc + cb + 3.0), 4.0) <= 1.0) & (
            z >= -hh - 9.0) & (z <= -0.1 * v.height)
        sap_in = (_sq(x - side * (ca + 4.5), 2.4) + _sq(y - (yc + cb * 0.55), 3.1) <= 1.0) & (
            z >= 0.15 * v.height + 1.2) & (z <= hh + 7.8)
        iap_in = (_sq(x - side * (ca + 0.5), 2.2) + _sq(y - (yc + cb + 3.0), 2.6) <= 1.0) & (
            z >= -hh - 7.8) & (z <= -0.1 * v.height - 1.2)
        add(sap | iap, inner=sap_in | iap_in)
        if v.transverse_length > 0:
            tp = (np.abs(x) >= ca + 5.0) & (side * x > 0) & (np.abs(x) <= ca + 5.0 + v.transverse_length) & (
                _sq(y - (yc - 1.0), 3.2) + _sq(z - 0.15 * v.height, 4.5) <= 1.0)
            add(tp)
    # Spinous process: a midline plate running posteriorly and a little caudally.
    y0 = yc + cb + 3.0
    t = y - y0
    zc = -0.1 * v.height - 0.3 * np.maximum(t, 0.0)
    sp = (np.abs(x) <= 3.2) & (t >= -3.0) & (t <= v.spinous_length) & (
        np.abs(z - zc) <= 0.28 * v.height * (1.0 - 0.3 * np.clip(t / v.spinous_length, 0, 1)))
    sp_in = (np.abs(x) <= 1.8) & (t >= 0.0) & (t <= v.spinous_length - 1.5) & (
        np.abs(z - zc) <= 0.28 * v.height * (1.0 - 0.3 * np.clip(t / v.spinous_length, 0, 1)) - 1.5)
    add(sp, inner=sp_in)
    if s1:
        # Sacral alae: wide lateral masses beside the S1 body.
        ala = (np.abs(x) >= a - 2.0) & (np.abs(x) <= a + 38.0) & (y >= -b + 6.0) & (y <= yc + cb) & (
            z <= hh - 2.0 - 0.25 * np.maximum(np.abs(x) - a, 0)) & (z >= -hh - 6.0)
        ala_in = ala & (np.abs(x) <= a + 36.5) & (y >= -b + 7.5) & (y <= yc + cb - 1.5) & (
            z <= hh - 3.5 - 0.25 * np.maximum(np.abs(x) - a, 0)) & (z >= -hh - 4.5)
        add(ala, inner=ala_in)
    canal = (rc <= 1.0) & ~body
    lab[bone & ~canal] = Tissue.CORTEX
    lab[marrow_m & ~canal] = Tissue.MARROW
    g.labels[idx] = lab


def _paint_spine(g: _Grid, anat: Anatomy) -> None:
    """Everything but the trunk, painted over ``g.labels`` in order of precedence."""
    cord_end = {"T10": 1.0, "T11": 1.0, "T12": 1.0, "L1": 0.6}
    for v in anat.vertebrae.values():
        _paint_canal(g, v.centroid, v.frame, v.depth, v.canal_width, v.canal_depth,
                     v.height / 2 + 2.5, cord_end.get(v.name, 0.0))
    for s in anat.sacrum:
        _paint_canal(g, s.centroid, s.frame, s.depth, s.canal_width, s.canal_depth,
                     s.height / 2 + 2.5, 0.0)
    for d in anat.discs.values():
        cord = 1.0 if d.name in ("T10-T11", "T11-T12", "T12-L1") else 0.0
        _paint_canal(g, d.centre, d.frame, d.depth, d.canal_width, d.canal_depth,
                     d.height / 2 + 6.0, cord, disc=d)
        _paint_disc(g, d)
    for v in anat.vertebrae.values():
        _paint_vertebra(g, v, s1=v.name == "S1")
    for s in anat.sacrum:
        _paint_vertebra(g, s)


def label_map(
    anatomy: Anatomy,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    slice_thickness: float = 0.0,
    supersample: int = 1,
) -> np.ndarray:
    """Tissue labels (:class:`Tissue`) of ``anatomy`` on any grid.

    ``shape`` is (slices, rows, columns); ``affine`` maps (column, row, slice, 1)
    to patient mm. Labels are evaluated at voxel centres; with ``supersample``
    k > 1 each slice gets k sub-slices spread over ``slice_thickness`` and the
    result has shape (slices * k, rows, columns), sub-slices of a slice adjacent.
    The soft-tissue trunk is evaluated once per slice (it changes slowly).
    """
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, float)
    key = (shape, affine.round(6).tobytes(), round(float(slice_thickness), 4), int(supersample))
    hit = anatomy._cache.get(key)
    if hit is not None:
        return hit
    # The trunk is smooth: paint it at half the in-plane resolution and repeat pixels.
    half = affine.copy()
    half[:3, :2] *= 2.0
    half[:3, 3] += 0.5 * (affine[:3, 0] + affine[:3, 1])
    g = _Grid((shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2), half)
    _paint_trunk(g, anatomy)
    base = g.labels.repeat(2, axis=1).repeat(2, axis=2)[:, : shape[1], : shape[2]]
    k = max(int(supersample), 1)
    out = np.empty((shape[0], k, shape[1], shape[2]), np.uint8)
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    for j, off in enumerate((np.arange(k) - (k - 1) / 2.0) * slice_thickness / k):
        aff = affine.copy()
        aff[:3, 3] = affine[:3, 3] + normal * off
        gj = _Grid(shape, aff)
        gj.labels = base.copy()
        _paint_spine(gj, anatomy)
        out[:, j] = gj.labels
    labels = out.reshape(shape[0] * k, shape[1], shape[2])
    if len(anatomy._cache) > 4:
        anatomy._cache.clear()
    anatomy._cache[key] = labels
    return labels


# ----------------------------------------------------------------------------- rendering


@dataclass
class RenderedSeries:
    """One rendered image series: voxel array, geometry and acquisition description.

    ``array`` is indexed [slice, row, column] (float32: MR arbitrary units
    0..~1000, CT in HU, DX 0..4095). ``affine`` maps (column, row, slice, 1) to
    LPS mm as in :class:`dicom_io.volume.Volume`. ``labels`` is the tissue label
    map the series was rendered from (same shape; None for projections).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str
    description: str
    contrast: str | None
    plane: str
    extra: dict = field(default_factory=dict)
    labels: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"array: expected [slice, row, column], got shape {self.array.shape}")
        if np.asarray(self.affine).shape != (4, 4):
            raise ValueError(f"affine: expected 4x4, got {np.asarray(self.affine).shape}")


def _series_rng(anat: Anatomy, tag: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(f"{anat.seed}:{tag}".encode()).digest()[:8], "little")
    return np.random.default_rng(h)


def _grid_affine(row_dir: np.ndarray, col_dir: np.ndarray, centre: np.ndarray, shape: tuple[int, int, int],
                 pixel: float, spacing: float) -> np.ndarray:
    """Affine of a stack centred on ``centre`` with the given image directions."""
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir - row_dir * (col_dir @ row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    s, r, c = shape
    aff = np.eye(4)
    aff[:3, 0] = row_dir * pixel
    aff[:3, 1] = col_dir * pixel
    aff[:3, 2] = normal * spacing
    aff[:3, 3] = centre - aff[:3, :3] @ np.array([(c - 1) / 2, (r - 1) / 2, (s - 1) / 2])
    return aff


def _interp_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) matrix that linearly interpolates m samples onto n points."""
    pos = np.linspace(0.0, m - 1.0, n)
    i0 = np.clip(np.floor(pos).astype(int), 0, m - 2) if m > 1 else np.zeros(n, int)
    w = pos - i0
    mat = np.zeros((n, m), np.float32)
    mat[np.arange(n), i0] = 1.0 - w
    if m > 1:
        mat[np.arange(n), i0 + 1] += w
    return mat


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int, amp: float) -> np.ndarray:
    """Smooth random multiplicative field around 1 for a [slice, row, column] stack.

    Two in-plane fields (coarse grids interpolated separably) blended along the
    slices: texture changes slowly through the stack at a fraction of the cost of a
    full 3-D field.
    """
    s, r, c = shape
    planes = []
    for _ in range(2):
        small = ndimage.gaussian_filter(rng.standard_normal((min(coarse, r), min(coarse, c))), 0.6)
        planes.append(_interp_matrix(r, small.shape[0]) @ small.astype(np.float32)
                      @ _interp_matrix(c, small.shape[1]).T)
    t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None]
    out = planes[0][None] * (1.0 - t) + planes[1][None] * t
    out /= max(float(np.abs(out).max()), 1e-6)
    return (1.0 + amp * out).astype(np.float32)


def _shade(labels: np.ndarray, contrast: str, rng: np.random.Generator, supersample: int,
           pixel_mm: float) -> np.ndarray:
    """Label map -> intensities with texture, slice averaging and in-plane blur."""
    lut = np.zeros(max(Tissue) + 1, np.float32)
    for t, val in _LUT[contrast].items():
        lut[int(t)] = val
    img = lut[labels]
    # Tissue texture: marrow and fat are heterogeneous, muscles a little.
    tex = _smooth_field(rng, labels.shape, 24, 0.12)
    textured = np.isin(labels, [Tissue.MARROW, Tissue.FAT, Tissue.MUSCLE, Tissue.EPIDURAL_FAT])
    img = np.where(textured, img * tex, img)
    # Bowel and abdominal organs: coarse blotches of very different signal.
    bowel = _smooth_field(rng, labels.shape, 48, 0.9)
    img = np.where(labels == Tissue.VISCERA, img * np.clip(bowel, 0.15, 2.2), img)
    if supersample > 1:
        s = labels.shape[0] // supersample
        img = img.reshape(s, supersample, *img.shape[1:]).mean(axis=1)
    sigma = 0.45 / max(pixel_mm, 0.3) + 0.2
    return ndimage.gaussian_filter(img, sigma=(0.0, sigma, sigma)).astype(np.float32)


def _mr_noise(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    # Rician magnitude noise: |signal + complex Gaussian|.
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    n1 += img
    return np.sqrt(n1 * n1 + n2 * n2)


def _check_kind(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {allowed}")


def mr_geometry(
    anatomy: Anatomy,
    plane: str,
    *,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    pixel_mm: float | None = None,
    fov_mm: float | None = None,
) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """Affine, shape (slices, rows, columns) and slice thickness of an MR series.

    Sagittal: true sagittal slices through the spine (anterior on the image left,
    superior at the top), about 15 slices of 4 mm with 0.4 mm gaps. Axial: one stack
    perpendicular to the mean axis of the lumbar discs, covering L1-L2 to L5-S1.
    """
    _check_kind("plane", plane, ("sagittal", "axial"))
    lumbar = [d for d in LUMBAR_DISCS if d in anatomy.discs]
    pts = np.array([anatomy.discs[d].centre for d in lumbar])
    if plane == "sagittal":
        thick = slice_thickness or 4.0
        n = n_slices or 15
        spans = np.array([v.centroid for v in anatomy.vertebrae.values()] + [anatomy.sacrum[-1].centroid])
        extent = float(spans[:, 2].max() - spans[:, 2].min()) + 60.0
        fov = fov_mm or max(300.0, math.ceil(extent / 20.0) * 20.0)
        px = pixel_mm or fov / 320.0
        size = int(round(fov / px))
        centre = np.array([anatomy.midline_x(), float(pts[:, 1].mean()) + 20.0,
                           float((spans[:, 2].max() + spans[:, 2].min()) / 2)])
        shape = (n, size, size)
        aff = _grid_affine(np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]), centre, shape, px,
                           thick * 1.1)
        return aff, shape, thick
    thick = slice_thickness or 4.0
    fov = fov_mm or 200.0
    px = pixel_mm or fov / 256.0
    size = int(round(fov / px))
    normal = np.mean([anatomy.discs[d].frame[:, 2] for d in lumbar], axis=0)
    normal /= np.linalg.norm(normal)
    left = np.array([1.0, 0.0, 0.0]) - normal[0] * normal
    left /= np.linalg.norm(left)
    post = np.cross(normal, left)
    proj = (pts - pts.mean(axis=0)) @ normal
    spacing = thick * 1.1
    n = n_slices or int(math.ceil((proj.max() - proj.min() + 16.0) / spacing)) + 1
    centre = pts.mean(axis=0) + normal * (proj.max() + proj.min()) / 2 + post * 22.0
    shape = (n, size, size)
    return _grid_affine(left, post, centre, shape, px, spacing), shape, thick


def render_mr(
    anatomy: Anatomy,
    contrast: str,
    plane: str,
    *,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    pixel_mm: float | None = None,
    fov_mm: float | None = None,
    rng: np.random.Generator | None = None,
) -> RenderedSeries:
    """Render an MR series of ``anatomy``.

    Parameters
    ----------
    contrast : str
        ``T2``, ``T1`` or ``STIR``.
    plane : str
        ``sagittal`` or ``axial`` (see :func:`mr_geometry` for the default geometry).
    n_slices, slice_thickness, pixel_mm, fov_mm : optional
        Override the default geometry.
    rng : numpy.random.Generator, optional
        Noise and texture; by default derived from the anatomy seed and the series.

    Raises
    ------
    ValueError
        If ``contrast`` or ``plane`` is unknown.
    """
    _check_kind("contrast", contrast, ("T2", "T1", "STIR"))
    aff, shape, thick = mr_geometry(anatomy, plane, n_slices=n_slices, slice_thickness=slice_thickness,
                                    pixel_mm=pixel_mm, fov_mm=fov_mm)
    rng = rng or _series_rng(anatomy, f"mr:{contrast}:{plane}")
    return _render_mr_grid(anatomy, contrast, plane, aff, shape, thick, rng)


def _render_mr_grid(anatomy: Anatomy, contrast: str, plane: str, aff: np.ndarray, shape: tuple[int, int, int],
                    thick: float, rng: np.random.Generator) -> RenderedSeries:
    """Render an MR series of ``anatomy`` on a given grid (``plane`` names it)."""
    # Thick sagittal slices average two sub-slices (partial volume at the foramina).
    k = 2 if plane == "sagittal" and thick >= 2.5 else 1
    labels = label_map(anatomy, shape, aff, thick, k)
    px = float(np.linalg.norm(aff[:3, 0]))
    img = _shade(labels, contrast, rng, k, px)
    # Receive-coil bias: the spine array coil lies under the patient's back.
    x, y, z = _Grid(shape, aff).patient()
    y_back = anatomy.trunk["y"] + anatomy.trunk["b"]
    bias = 0.55 + 0.6 * np.exp(-np.maximum(y_back - y, 0.0) / 140.0)
    img = img * bias * _smooth_field(rng, shape, 4, 0.08)
    img = _mr_noise(img, rng, 14.0)
    lab_mid = labels if k == 1 else labels[k // 2::k]
    desc = {"sagittal": f"SAG {contrast} TSE" if contrast != "STIR" else "SAG STIR",
            "axial": f"AX {contrast}" if contrast != "STIR" else "AX STIR"}.get(plane, f"{plane.upper()} {contrast}")
    extra = dict(_MR_PARAMS[contrast])
    extra.update({"SliceThickness": thick, "MagneticFieldStrength": 1.5})
    return RenderedSeries(array=np.clip(img, 0, 4000).astype(np.float32), affine=aff, modality="MR",
                          description=desc, contrast=contrast, plane=plane, extra=extra, labels=lab_mid)


def render_ct(
    anatomy: Anatomy,
    *,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    pixel_mm: float | None = None,
    fov_mm: float | None = None,
    rng: np.random.Generator | None = None,
) -> RenderedSeries:
    """Render an axial CT stack of the lumbar spine in Hounsfield units.

    True axial slices (no gantry tilt) of 3 mm from above L1-L2 to below L5-S1,
    200 mm field of view on 256 x 256 pixels by default; bone bright, discs soft
    tissue, fat negative.
    """
    thick = slice_thickness or 3.0
    fov = fov_mm or 200.0
    px = pixel_mm or fov / 256.0
    size = int(round(fov / px))
    lumbar = [d for d in LUMBAR_DISCS if d in anatomy.discs]
    pts = np.array([anatomy.discs[d].centre for d in lumbar])
    z_hi, z_lo = float(pts[:, 2].max()) + 12.0, float(pts[:, 2].min()) - 12.0
    n = n_slices or int(math.ceil((z_hi - z_lo) / thick)) + 1
    centre = np.array([anatomy.midline_x(), float(pts[:, 1].mean()) + 22.0, (z_hi + z_lo) / 2])
    shape = (n, size, size)
    aff = _grid_affine(np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), centre, shape, px, thick)
    rng = rng or _series_rng(anatomy, "ct")
    labels = label_map(anatomy, shape, aff)
    img = _shade(labels, "CT", rng, 1, px)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(12.0)  # quantum noise
    extra = {"SliceThickness": thick, "KVP": 120, "ConvolutionKernel": "STANDARD",
             "WindowCenter": 400.0, "WindowWidth": 1800.0}
    return RenderedSeries(array=np.clip(img, -1024, 3000).astype(np.float32), affine=aff, modality="CT",
                          description="CT L-SPINE AXIAL", contrast=None, plane="axial", extra=extra,
                          labels=labels)


#: Linear attenuation per mm (relative to water at about 0.02) for the radiographs.
_MU: dict[Tissue, float] = {
    Tissue.AIR: 0.0, Tissue.FAT: 0.017, Tissue.MUSCLE: 0.021, Tissue.VISCERA: 0.0195,
    Tissue.CORTEX: 0.075, Tissue.MARROW: 0.032, Tissue.ANNULUS: 0.022, Tissue.NUCLEUS: 0.021,
    Tissue.NUCLEUS_DEGENERATED: 0.022, Tissue.HERNIATION: 0.022, Tissue.CSF: 0.02, Tissue.NERVE: 0.02,
    Tissue.EPIDURAL_FAT: 0.017, Tissue.LIGAMENT: 0.022, Tissue.VESSEL: 0.021, Tissue.FORAMEN_FAT: 0.017,
    Tissue.NUCLEUS_DESICCATED: 0.021,
}


def render_dx(
    anatomy: Anatomy,
    view: str = "AP",
    xray: XrayFindings | None = None,
    *,
    pixel_mm: float = 0.8,
    voxel_mm: float = 2.0,
    rng: np.random.Generator | None = None,
) -> RenderedSeries:
    """Render a lumbar radiograph (parallel projection) as one 0..4095 image.

    Parameters
    ----------
    view : str
        ``AP`` (coronal projection, patient left on the image right) or ``LAT``
        (left lateral, anterior on the image left).
    xray : XrayFindings, optional
        When it differs from ``anatomy.xray``, the anatomy is rebuilt from its seed
        with this finding (scoliosis curves the column on the AP view;
        spondylolisthesis slips L4 or L5 forwards on the lateral view).
    pixel_mm, voxel_mm : float
        Output pixel size and the size of the voxels integrated along the beam.

    Raises
    ------
    ValueError
        If ``view`` is unknown.
    """
    _check_kind("view", view, ("AP", "LAT"))
    if xray is not None and xray.label != anatomy.xray.label:
        overrides = {k: v for k, v in anatomy.overrides.items()
                     if k not in ("scoliosis_mm", "slip_mm", "xray")}
        anatomy = make_anatomy(anatomy.seed, anatomy.findings, anatomy.top, xray=xray, **overrides)
    t = anatomy.trunk
    tops = [v.superior_endplate[2] for v in anatomy.vertebrae.values()]
    z_hi = float(max(tops)) + 30.0
    z_lo = float(anatomy.sacrum[-1].inferior_endplate[2]) - 30.0
    half_x = min(t["a"], 150.0)
    lo = np.array([t["x"] - half_x, t["y"] - t["b"], z_lo])
    hi = np.array([t["x"] + half_x, t["y"] + t["b"], z_hi])
    n = np.ceil((hi - lo) / voxel_mm).astype(int) + 1
    aff = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    aff[:3, 3] = lo
    labels = label_map(anatomy, (int(n[2]), int(n[1]), int(n[0])), aff)  # [z, y, x]
    mu = np.zeros(max(Tissue) + 1, np.float32)
    for tissue, value in _MU.items():
        mu[int(tissue)] = value
    att = mu[labels]
    if view == "AP":
        proj = att.sum(axis=1) * voxel_mm  # [z, x]
        row_dir, plane_pt = np.array([1.0, 0.0, 0.0]), np.array([lo[0], np.mean([
            v.centroid[1] for v in anatomy.vertebrae.values()]), z_hi])
    else:
        proj = att.sum(axis=2) * voxel_mm  # [z, y]
        row_dir, plane_pt = np.array([0.0, 1.0, 0.0]), np.array([anatomy.midline_x(), lo[1], z_hi])
    proj = proj[::-1]  # rows run head to foot
    proj = ndimage.zoom(proj, voxel_mm / pixel_mm, order=1)
    # Detector processing: log image with unsharp masking, as on a clinical workstation.
    sharp = proj + 1.5 * (proj - ndimage.gaussian_filter(proj, 12.0 / pixel_mm))
    body = proj > 0.5
    lo_v, hi_v = np.percentile(sharp[body], [0.5, 99.8]) if body.any() else (0.0, 1.0)
    img = np.clip((sharp - lo_v) / max(hi_v - lo_v, 1e-6), 0.0, 1.0) ** 0.8 * 3800.0 + 100.0
    img[~body] = 60.0
    rng = rng or _series_rng(anatomy, f"dx:{view}")
    img = img + rng.normal(0.0, 18.0, img.shape)
    img = np.clip(img, 0.0, 4095.0).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * pixel_mm
    affine[:3, 1] = np.array([0.0, 0.0, -1.0]) * pixel_mm
    affine[:3, 2] = np.cross(row_dir, [0.0, 0.0, -1.0])
    affine[:3, 3] = plane_pt
    desc = "L-SPINE AP" if view == "AP" else "L-SPINE LAT"
    extra = {"ViewPosition": "AP" if view == "AP" else "LL", "KVP": 85 if view == "AP" else 95}
    return RenderedSeries(array=img[None], affine=affine, modality="DX", description=desc, contrast=None,
                          plane="coronal" if view == "AP" else "sagittal", extra=extra)


# ----------------------------------------------------------------------------- clinical MR profile

#: Study profiles of :func:`write_demo_study`; ``clinical`` is an MR profile.
PROFILES: tuple[str, ...] = ("default", "clinical")
#: Transfer syntax of the clinical profile: JPEG 2000 lossless, the usual lossless one in PACS
#: archives (pydicom encodes it with pylibjpeg-openjpeg).
CLINICAL_TRANSFER_SYNTAX = "1.2.840.10008.1.2.4.90"
#: Lossless transfer syntaxes pydicom encodes (with pylibjpeg-openjpeg, pyjpegls, or itself for RLE).
LOSSLESS_TRANSFER_SYNTAXES: tuple[str, ...] = (CLINICAL_TRANSFER_SYNTAX, "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5")
#: Rows and columns of every clinical-profile image.
CLINICAL_MATRIX = 512
#: Images per plane of the clinical 3-plane localizer; slices per sagittal series; per axial stack.
CLINICAL_LOCALIZER_PER_PLANE, CLINICAL_SAGITTAL_SLICES, CLINICAL_AXIAL_SLICES = 5, 19, 60

#: A fast gradient-echo localizer (what scanners run first); flagged LOCALIZER in ImageType.
_LOCALIZER_PARAMS: dict[str, Any] = {
    "RepetitionTime": 8.6, "EchoTime": 4.0, "ScanningSequence": ["GR"], "SequenceVariant": ["SP"],
    "ScanOptions": "", "EchoTrainLength": 1, "SequenceName": "*fl2d1", "FlipAngle": 20.0,
    "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
}


def _centred_on(aff: np.ndarray, shape: tuple[int, int, int], point: np.ndarray) -> np.ndarray:
    """``aff`` moved along its slice normal so that the stack's middle slice passes through ``point``."""
    centre = aff[:3, :3] @ ((np.array(shape[::-1], float) - 1.0) / 2.0) + aff[:3, 3]
    normal = aff[:3, 2] / np.linalg.norm(aff[:3, 2])
    out = aff.copy()
    out[:3, 3] += normal * float((point - centre) @ normal)
    return out


def _clinical_mr_series(anatomy: Anatomy, matrix: int = CLINICAL_MATRIX) -> list[list[RenderedSeries]]:
    """The clinical profile's MR series of ``anatomy`` in acquisition order, each as its parts.

    A 3-plane localizer (one series of three parts: sagittal, coronal, axial), sagittal T1, T2
    and STIR sharing one geometry, an axial T2 stack from L1 to S1, a thin axial T2 stack
    centred on L4-L5 and an axial T1 with the first stack's geometry; ``matrix`` pixels square.
    """
    pts = np.array([anatomy.discs[d].centre for d in LUMBAR_DISCS if d in anatomy.discs])
    centre = np.array([anatomy.midline_x(), float(pts[:, 1].mean()), float(pts[:, 2].mean())])
    out: list[list[RenderedSeries]] = []

    n, fov = CLINICAL_LOCALIZER_PER_PLANE, 380.0
    planes = {"sagittal": ([0.0, 1.0, 0.0], [0.0, 0.0, -1.0], 8.0),
              "coronal": ([1.0, 0.0, 0.0], [0.0, 0.0, -1.0], 10.0),
              "axial": ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], 30.0)}
    parts = []
    for plane, (row, col, spacing) in planes.items():
        shape = (n, matrix, matrix)
        aff = _grid_affine(np.array(row), np.array(col), centre, shape, fov / matrix, spacing)
        r = _render_mr_grid(anatomy, "T1", plane, aff, shape, 6.0,
                            _series_rng(anatomy, f"clinical:localizer:{plane}"))
        r.extra = {**_LOCALIZER_PARAMS, "SliceThickness": 6.0, "MagneticFieldStrength": 1.5}
        r.description = "3-PLANE LOCALIZER"
        parts.append(r)
    out.append(parts)

    aff, shape, _ = mr_geometry(anatomy, "sagittal")
    sag_fov = shape[1] * float(np.linalg.norm(aff[:3, 0]))
    sag = {"n_slices": CLINICAL_SAGITTAL_SLICES, "slice_thickness": 3.5, "fov_mm": sag_fov,
           "pixel_mm": sag_fov / matrix}
    ax = {"n_slices": CLINICAL_AXIAL_SLICES, "slice_thickness": 3.0, "fov_mm": 200.0, "pixel_mm": 200.0 / matrix}
    aff_thin, shape_thin, _ = mr_geometry(anatomy, "axial", **{**ax, "slice_thickness": 2.0})
    aff_thin = _centred_on(aff_thin, shape_thin, anatomy.discs["L4-L5"].centre)
    for contrast, plane, description in (("T1", "sagittal", "SAG T1 TSE"), ("T2", "sagittal", "SAG T2 TSE"),
                                         ("STIR", "sagittal", "SAG STIR"), ("T2", "axial", "AX T2 TSE"),
                                         ("T2", "thin", "AX T2 L3-S1"), ("T1", "axial", "AX T1 TSE")):
        rng = _series_rng(anatomy, f"clinical:{description}")
        if plane == "thin":
            r = _render_mr_grid(anatomy, contrast, "axial", aff_thin, shape_thin, 2.0, rng)
        else:
            r = render_mr(anatomy, contrast, plane, rng=rng, **(sag if plane == "sagittal" else ax))
        r.description = description
        out.append([r])
    return out


def _check_transfer_syntax(uid: str) -> None:
    from pydicom.pixels import get_encoder

    if uid not in LOSSLESS_TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax: {uid!r} is not one of {LOSSLESS_TRANSFER_SYNTAXES}")
    if not get_encoder(uid).is_available:
        raise ValueError(f"transfer_syntax: the encoder for {uid!r} has no plugin installed here")


def _finish_series(files: list[Path], folder: Path, transfer_syntax: str | None) -> list[Path]:
    """Rewrite a series' files as ``folder/NNNN.dcm``, one series, compressed when asked.

    Parts written separately (a multi-plane localizer) get the first part's Series Instance
    UID and consecutive instance numbers; their folders are removed.
    """
    from pydicom import dcmread

    series_uid = None
    out: list[Path] = []
    for number, src in enumerate(files, start=1):
        ds = dcmread(src)
        series_uid = series_uid or ds.SeriesInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = number
        if transfer_syntax:
            # A lossless re-encoding keeps the instance's identity: the SOP Instance UID stays.
            ds.compress(transfer_syntax, generate_instance_uid=False)
        dst = folder / f"{number:04d}.dcm"
        ds.save_as(dst, enforce_file_format=True)
        out.append(dst)
    for src in set(files) - set(out):
        src.unlink()
    for part in {src.parent for src in files} - {folder}:
        part.rmdir()
    return out


# ----------------------------------------------------------------------------- ground truth


def ground_truth(anatomy: Anatomy, xray: XrayFindings | None = None) -> dict:
    """JSON-ready ground truth: level points (LPS mm), findings per disc, X-ray label, seed."""
    xr = xray or anatomy.xray
    return {
        "synthetic": True,
        "seed": anatomy.seed,
        "coordinates": "DICOM patient LPS, mm",
        "levels": {k: [round(float(c), 3) for c in p] for k, p in anatomy.levels_mm().items()},
        "endplates": {
            n: {"superior": [round(float(c), 3) for c in v.superior_endplate],
                "inferior": [round(float(c), 3) for c in v.inferior_endplate]}
            for n, v in anatomy.vertebrae.items()
        },
        "findings": {k: asdict(f) for k, f in anatomy.findings.items()},
        "xray": xr.label,
        "variation": anatomy.variation,
    }


def _study_key(modality: str, seed: int, anatomy: Anatomy) -> str:
    gt = ground_truth(anatomy)
    blob = json.dumps({"m": modality, "f": gt["findings"], "x": gt["xray"], "v": gt["variation"],
                       "t": anatomy.top}, sort_keys=True)
    return f"discus-phantom:{modality}:{seed}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def write_demo_study(
    out: Path,
    modality: str = "MR",
    seed: int = 0,
    findings: dict[str, LevelFindings] | None = None,
    xray: XrayFindings | None = None,
    *,
    profile: str = "default",
    transfer_syntax: str | None = None,
    **kw: Any,
) -> Path:
    """Write a synthetic lumbar study as DICOM files with its ground truth beside it.

    Parameters
    ----------
    out : Path
        Folder for ``<series folder>/<NNNN>.dcm`` and ``ground_truth.json``.
    modality : str
        ``MR`` (SAG T2, SAG T1, AX T2), ``CT`` (one axial series) or ``DX`` (AP
        and lateral radiographs).
    seed : int
        Seeds the anatomy, the findings (when not given), noise and UIDs.
    findings : dict of str to LevelFindings, optional
        Findings per disc; drawn with :func:`random_findings` when None.
    xray : XrayFindings, optional
        The radiographic finding; for DX drawn from the seed when None, otherwise normal.
    profile : str
        ``default`` (the series above, uncompressed) or, for MR, ``clinical``: the size of a
        clinical lumbar MR study, 252 images of 512 x 512 in 7 series (a 3-plane localizer of
        15, sagittal T1, T2 and STIR of 19, an axial T2 stack of 60 from L1 to S1, a thin axial
        T2 stack of 60 centred on L4-L5 and an axial T1 of 60), written in
        :data:`CLINICAL_TRANSFER_SYNTAX`; its UIDs differ from the default study's.
    transfer_syntax : str, optional
        Lossless transfer syntax UID to write the pixel data in, one of
        :data:`LOSSLESS_TRANSFER_SYNTAXES` (JPEG 2000, JPEG-LS, RLE) whose encoder is installed;
        None: the profile's (uncompressed for ``default``). Instance UIDs do not change with it.
    **kw
        ``top`` and the variation keywords of :func:`make_anatomy`.

    Returns
    -------
    Path
        The ground-truth JSON file. Same arguments give byte-identical files.

    Raises
    ------
    ValueError
        If ``modality`` or ``profile`` is unknown, ``clinical`` is asked for another modality
        than MR, or ``transfer_syntax`` cannot be encoded here.
    """
    from dicom_io.writer import StudyInfo, write_series

    _check_kind("modality", modality, ("MR", "CT", "DX"))
    _check_kind("profile", profile, PROFILES)
    if profile == "clinical" and modality != "MR":
        raise ValueError(f"profile: 'clinical' is an MR profile, got modality {modality!r}")
    if profile == "clinical" and transfer_syntax is None:
        transfer_syntax = CLINICAL_TRANSFER_SYNTAX
    if transfer_syntax is not None:
        _check_transfer_syntax(transfer_syntax)
    rng = np.random.default_rng([int(seed), 0xF1D])
    if findings is None:
        findings = random_findings(rng)
    if xray is None:
        xray = XrayFindings(str(rng.choice(XRAY_LABELS))) if modality == "DX" else XrayFindings()
    top = kw.pop("top", "T12")
    anatomy = make_anatomy(seed, findings, top, xray=xray, **kw)
    key = _study_key(modality, seed, anatomy)
    if profile != "default":
        key += f":{profile}"
    study = StudyInfo(uid_seed=key, patient_id=f"PHANTOM-{seed:06d}", accession_number=f"SYN{seed:06d}",
                      study_description=f"SYNTHETIC LUMBAR SPINE {modality} PHANTOM")
    if profile == "clinical":
        series = _clinical_mr_series(anatomy)
    elif modality == "MR":
        series = [[render_mr(anatomy, "T2", "sagittal")], [render_mr(anatomy, "T1", "sagittal")],
                  [render_mr(anatomy, "T2", "axial")]]
        series[1][0].description = "SAG T1"
    elif modality == "CT":
        series = [[render_ct(anatomy)]]
    else:
        series = [[render_dx(anatomy, "AP")], [render_dx(anatomy, "LAT")]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    listing = []
    for number, parts in enumerate(series, start=1):
        r = parts[0]
        folder = f"{number:02d}-{r.description.replace(' ', '_')}"
        files = []
        for j, part in enumerate(parts):
            files += write_series(part.array, part.affine, out / folder / (f"part{j}" if len(parts) > 1 else ""),
                                  modality=part.modality, study=study, series_description=part.description,
                                  series_number=number, extra=part.extra,
                                  uid_seed=f"{key}:{number}" + (f":{j}" if j else ""))
        if len(parts) > 1 or transfer_syntax is not None:
            files = _finish_series(files, out / folder, transfer_syntax)
        listing.append({"folder": folder, "description": r.description, "modality": r.modality,
                        "plane": "+".join(part.plane for part in parts), "contrast": r.contrast,
                        "series_number": number,
                        "instances": len(files)})
    truth = ground_truth(anatomy, xray)
    truth.update({"modality": modality, "study_instance_uid": study.study_instance_uid,
                  "frame_of_reference_uid": study.frame_of_reference_uid, "series": listing})
    if profile != "default":
        truth["profile"] = profile
    if transfer_syntax is not None:
        truth["transfer_syntax"] = transfer_syntax
    path = out / "ground_truth.json"
    path.write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n")
    return path
