"""Measurements on synthetic sagittal masks with known answers.

Shapes are convex polygons given in mm and rasterised by pixel centre, so each border
of the mask lies within half a pixel of the true border. A length measured along a
unit direction ``n`` ends, at each end, within half the pixel's extent along ``n``
(``(|n_row| * row spacing + |n_col| * column spacing) / 2``) plus half the sampling step
of the true end: :func:`tolerance` is the sum for both ends. Polygons are shifted by a
fraction of a pixel so that no border passes exactly through pixel centres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from models import measurements as ms
from models.measurements import (
    CANAL_LABEL,
    Category,
    Measurement,
    SagittalMeasurements,
    disc_label,
    genant_grade,
    measure_sagittal,
    meyerding_grade,
    stenosis_category,
)

LUMBAR = ("L1", "L2", "L3", "L4", "L5", "S1")
HEIGHT, DEPTH, GAP = 25.0, 35.0, 10.0


def tolerance(spacing: Sequence[float], angle_deg: float = 0.0) -> float:
    """Largest pixelisation error (mm) of a length measured along a direction ``angle_deg`` from the rows."""
    a = math.radians(angle_deg)
    return abs(math.cos(a)) * spacing[0] + abs(math.sin(a)) * spacing[1] + min(spacing) / 8.0


def rasterise(shape: tuple[int, int], spacing: Sequence[float], vertices: np.ndarray) -> np.ndarray:
    """Pixels whose centre lies in the convex polygon ``vertices`` ((y, x) mm, either winding)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    yy, xx = yy * spacing[0], xx * spacing[1]
    v = np.asarray(vertices, float)
    signs = []
    for (y0, x0), (y1, x1) in zip(v, np.roll(v, -1, axis=0)):
        signs.append((y1 - y0) * (xx - x0) - (x1 - x0) * (yy - y0))
    s = np.stack(signs)
    return np.all(s >= 0, axis=0) | np.all(s <= 0, axis=0)


def box(centre: np.ndarray, tilt_deg: float, height: float, depth: float) -> dict[str, np.ndarray]:
    """Corners SA, SP, IP, IA of a body tilted by ``tilt_deg`` (its axis turned towards posterior)."""
    t = math.radians(tilt_deg)
    axis, ap = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    return {
        "SA": centre - height / 2 * axis - depth / 2 * ap, "SP": centre - height / 2 * axis + depth / 2 * ap,
        "IP": centre + height / 2 * axis + depth / 2 * ap, "IA": centre + height / 2 * axis - depth / 2 * ap,
    }


def spine(
    spacing: Sequence[float] = (1.0, 1.0),
    levels: Sequence[str] = LUMBAR,
    tilts: Sequence[float] | None = None,
    shifts: dict[str, float] | None = None,
    heights: dict[str, tuple[float, float]] | None = None,
    rotate_deg: float = 0.0,
    canal_mm: float | None = None,
) -> np.ndarray:
    """A labelled stack of bodies and discs.

    ``tilts`` per body (degrees, positive: axis turned posteriorly going down), ``shifts``
    moves a body anteriorly (mm), ``heights`` makes a body a symmetric trapezoid of
    (anterior, posterior) height, ``canal_mm`` adds a canal band of that AP width 3 mm
    behind the bodies (straight stacks), ``rotate_deg`` turns everything in the image.
    """
    tilts = list(tilts) if tilts is not None else [0.0] * len(levels)
    shifts, heights = shifts or {}, heights or {}
    polys: list[tuple[int, np.ndarray]] = []
    bodies = {}
    centre = np.array([0.0, 0.0])
    for i, (name, tilt) in enumerate(zip(levels, tilts)):
        if i:
            t0, t1 = math.radians(tilts[i - 1]), math.radians(tilt)
            prev_axis, axis = np.array([math.cos(t0), math.sin(t0)]), np.array([math.cos(t1), math.sin(t1)])
            step = (prev_axis + axis) / np.linalg.norm(prev_axis + axis)
            prev = bodies[levels[i - 1]]
            prev_bottom = (prev["IA"] + prev["IP"]) / 2 + shifts.get(levels[i - 1], 0.0) * np.array([0, 1.0])
            centre = prev_bottom + GAP * step + HEIGHT / 2 * axis
        b = box(centre - np.array([0.0, shifts.get(name, 0.0)]), tilt, HEIGHT, DEPTH)
        if name in heights:
            ha, hp = heights[name]
            b["SA"], b["IA"] = b["SA"] + (HEIGHT - ha) / 2 * np.array([1, 0]), b["IA"] - (HEIGHT - ha) / 2 * np.array([1, 0])
            b["SP"], b["IP"] = b["SP"] + (HEIGHT - hp) / 2 * np.array([1, 0]), b["IP"] - (HEIGHT - hp) / 2 * np.array([1, 0])
        bodies[name] = b
    for upper, lower in zip(levels[:-1], levels[1:]):
        u, lo = bodies[upper], bodies[lower]
        polys.append((disc_label(f"{upper}-{lower}"), np.array([u["IA"], u["IP"], lo["SP"], lo["SA"]])))
    for name in levels:
        b = bodies[name]
        polys.append((ms.VERTEBRA_LABELS[name], np.array([b["SA"], b["SP"], b["IP"], b["IA"]])))
    if canal_mm is not None:
        top, bottom = min(b["SA"][0] for b in bodies.values()) - 5, max(b["IA"][0] for b in bodies.values()) + 5
        x0 = DEPTH / 2 + 3
        polys.insert(0, (CANAL_LABEL, np.array([[top, x0], [top, x0 + canal_mm], [bottom, x0 + canal_mm], [bottom, x0]])))
    r = math.radians(rotate_deg)
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    polys = [(value, v @ rot.T) for value, v in polys]
    allv = np.concatenate([v for _, v in polys])
    # a margin, plus a share of a pixel so no border runs through pixel centres
    offset = -allv.min(axis=0) + 10.0 + 0.3 * np.asarray(spacing)
    size = allv.max(axis=0) + offset + 10.0
    shape = (int(size[0] / spacing[0]) + 1, int(size[1] / spacing[1]) + 1)
    labels = np.zeros(shape, np.int32)
    for value, v in polys:
        labels[rasterise(shape, spacing, v + offset)] = value
    return labels


def value(result: SagittalMeasurements, level: str, name: str) -> float:
    m = result.get(level, name)
    assert m is not None, f"{name} at {level} not measured; notes: {result.notes}"
    return m.value


# --------------------------------------------------------------------------- labels and grades


def test_label_scheme() -> None:
    assert ms.VERTEBRA_LABELS["T10"] == 17 and ms.VERTEBRA_LABELS["L5"] == 24 and ms.VERTEBRA_LABELS["S1"] == 26
    assert disc_label("T12-L1") == 119 and disc_label("L4-L5") == 123 and disc_label("L5-S1") == 124
    assert ms.LABEL_NAMES[123] == "L4-L5" and ms.LABEL_NAMES[CANAL_LABEL] == "canal"
    with pytest.raises(ValueError, match="name"):
        disc_label("L4-L6")


def test_grade_boundaries() -> None:
    assert [genant_grade(x) for x in (0.0, 19.9, 20.0, 24.9, 25.0, 39.9, 40.0, 80.0)] == list("00112233")
    assert [meyerding_grade(x) for x in (0.0, -4.9, 5.0, -24.9, 25.0, 50.0, 75.0, 99.9, 100.0, 130.0)] == [
        "0", "0", "I", "I", "II", "III", "IV", "IV", "V", "V"]
    assert [stenosis_category(x) for x in (9.9, 10.0, 12.9, 13.0)] == ["absolute", "relative", "relative", "normal"]
    with pytest.raises(ValueError, match="height_loss_percent"):
        genant_grade(-1.0)
    with pytest.raises(ValueError, match="diameter_mm"):
        stenosis_category(float("nan"))


def test_results_validate_themselves() -> None:
    m = Measurement("L3", ms.ANTERIOR_BODY_HEIGHT, 24.0, "mm", ((1.0, 2.0), (3.0, 4.0)))
    assert m.points == ((1.0, 2.0), (3.0, 4.0))
    with pytest.raises(ValueError, match="unit"):
        Measurement("L3", ms.ANTERIOR_BODY_HEIGHT, 24.0, "cm")
    with pytest.raises(ValueError, match="name"):
        Measurement("L3", "body volume", 24.0, "mm")
    with pytest.raises(ValueError, match="level"):
        Measurement("L7", ms.ANTERIOR_BODY_HEIGHT, 24.0, "mm")
    with pytest.raises(ValueError, match="value"):
        Measurement("L3", ms.ANTERIOR_BODY_HEIGHT, float("inf"), "mm")
    with pytest.raises(ValueError, match="points"):
        Measurement("L3", ms.ANTERIOR_BODY_HEIGHT, 24.0, "mm", ((1.0, 2.0),))
    with pytest.raises(ValueError, match="value"):
        Category("L3", ms.GENANT_GRADE, "4", "")


@pytest.mark.parametrize(
    ("labels", "spacing", "error", "argument"),
    [
        (np.zeros((4, 4, 4), np.int32), (1.0, 1.0), ValueError, "labels"),
        (np.zeros((4, 4), np.float32), (1.0, 1.0), TypeError, "labels"),
        ([[0, 1], [1, 0]], (1.0, 1.0), TypeError, "labels"),
        (np.zeros((4, 4), np.int32), (1.0,), ValueError, "spacing_mm"),
        (np.zeros((4, 4), np.int32), (1.0, 0.0), ValueError, "spacing_mm"),
        (np.zeros((4, 4), np.int32), (1.0, float("nan")), ValueError, "spacing_mm"),
        (np.zeros((4, 4), np.int32), "1.0", TypeError, "spacing_mm"),
        (np.zeros((4, 4), np.int32), (1.0, "1"), TypeError, "spacing_mm"),
    ],
)
def test_invalid_input_names_the_argument(labels: object, spacing: object, error: type, argument: str) -> None:
    with pytest.raises(error, match=argument):
        measure_sagittal(labels, spacing)  # type: ignore[arg-type]


def test_empty_mask_measures_nothing() -> None:
    result = measure_sagittal(np.zeros((32, 32), np.uint8), (1.0, 1.0))
    assert result.measurements == () and result.categories == () and result.to_rows() == []


# --------------------------------------------------------------------------- heights


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 1.0)])
def test_rectangles_give_body_and_disc_heights(spacing: tuple[float, float]) -> None:
    result = measure_sagittal(spine(spacing), spacing)
    tol = tolerance(spacing)
    for level in LUMBAR[:-1]:
        for name in (ms.ANTERIOR_BODY_HEIGHT, ms.MIDDLE_BODY_HEIGHT, ms.POSTERIOR_BODY_HEIGHT):
            assert value(result, level, name) == pytest.approx(HEIGHT, abs=tol)
        assert result.category(level, ms.GENANT_GRADE).value == "0"  # type: ignore[union-attr]
        assert value(result, level, ms.WEDGE_RATIO) == pytest.approx(1.0, abs=2 * tol / (HEIGHT - tol))
    for upper, lower in zip(LUMBAR[:-1], LUMBAR[1:]):
        for name in (ms.DISC_HEIGHT_ANTERIOR, ms.DISC_HEIGHT_MIDDLE, ms.DISC_HEIGHT_POSTERIOR):
            assert value(result, f"{upper}-{lower}", name) == pytest.approx(GAP, abs=tol)
    assert result.get("S1", ms.ANTERIOR_BODY_HEIGHT) is None  # S1 is a reference, not graded


def test_height_segments_lie_on_the_body() -> None:
    labels = spine()
    result = measure_sagittal(labels, (1.0, 1.0))
    m = result.get("L3", ms.MIDDLE_BODY_HEIGHT)
    assert m is not None and len(m.points) == 2
    (r0, c0), (r1, c1) = m.points
    assert abs(c1 - c0) < 0.5 and abs(abs(r1 - r0) - m.value) < 1e-9  # vertical, as long as the value
    assert labels[int(round((r0 + r1) / 2)), int(round(c0))] == ms.VERTEBRA_LABELS["L3"]
    assert result.get("L3", ms.WEDGE_RATIO).points == ()  # type: ignore[union-attr]


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 1.0)])
def test_rotated_stack_keeps_its_heights(spacing: tuple[float, float]) -> None:
    result = measure_sagittal(spine(spacing, rotate_deg=20.0), spacing)
    tol = tolerance(spacing, 20.0)
    for level in LUMBAR[:-1]:
        for name in (ms.ANTERIOR_BODY_HEIGHT, ms.MIDDLE_BODY_HEIGHT, ms.POSTERIOR_BODY_HEIGHT):
            assert value(result, level, name) == pytest.approx(HEIGHT, abs=tol)
    for upper, lower in zip(LUMBAR[:-1], LUMBAR[1:]):
        assert value(result, f"{upper}-{lower}", ms.DISC_HEIGHT_MIDDLE) == pytest.approx(GAP, abs=tol)


def test_wedge_body() -> None:
    # L2 a symmetric trapezoid: 10 mm anterior, 28 mm posterior corner heights; heights are read
    # 15 % of the depth in from each wall, where the trapezoid is 12.7 and 25.3 mm tall
    ha, hp = 10.0, 28.0
    result = measure_sagittal(spine(heights={"L2": (ha, hp)}), (1.0, 1.0))
    expected = [ha + f * (hp - ha) for f in ms.HEIGHT_FRACTIONS]
    # plus the slope of the endplates (9/35) times half a column, at each end
    tol = tolerance((1.0, 1.0)) + 2 * (hp - ha) / 2 / DEPTH * 0.5
    got = [value(result, "L2", n) for n in (ms.ANTERIOR_BODY_HEIGHT, ms.MIDDLE_BODY_HEIGHT, ms.POSTERIOR_BODY_HEIGHT)]
    assert got == pytest.approx(expected, abs=tol)
    assert value(result, "L2", ms.WEDGE_RATIO) == pytest.approx(got[0] / got[2])
    assert value(result, "L2", ms.BODY_HEIGHT_LOSS) == pytest.approx(100 * (1 - got[0] / got[2]))
    assert result.category("L2", ms.GENANT_GRADE).value == "3"  # type: ignore[union-attr]  # 50 % +- 6 %
    assert result.category("L3", ms.GENANT_GRADE).value == "0"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- slip


@pytest.mark.parametrize(("shift", "grade"), [(5.0, "I"), (14.0, "II")])
def test_anterior_slip(shift: float, grade: str) -> None:
    result = measure_sagittal(spine(shifts={"L4": shift}), (1.0, 1.0))
    tol = tolerance((1.0, 1.0))
    assert value(result, "L4-L5", ms.SLIP) == pytest.approx(shift, abs=tol)
    percent = value(result, "L4-L5", ms.SLIP_PERCENT)
    assert (shift - tol) / (DEPTH + tol) * 100 <= percent <= (shift + tol) / (DEPTH - tol) * 100
    assert result.category("L4-L5", ms.MEYERDING_GRADE).value == grade  # type: ignore[union-attr]
    # L3 stays put, so it lies behind the shifted L4: retrolisthesis of the same size
    assert value(result, "L3-L4", ms.SLIP) == pytest.approx(-shift, abs=tol)
    for level in ("L1-L2", "L2-L3", "L5-S1"):
        assert abs(value(result, level, ms.SLIP)) <= tol
        assert result.category(level, ms.MEYERDING_GRADE).value == "0"  # type: ignore[union-attr]


def test_slip_is_measured_along_the_lower_endplate_when_rotated() -> None:
    spacing = (0.5, 1.0)
    result = measure_sagittal(spine(spacing, shifts={"L4": 8.0}, rotate_deg=-20.0), spacing)
    assert value(result, "L4-L5", ms.SLIP) == pytest.approx(8.0, abs=tolerance(spacing, 70.0))


# --------------------------------------------------------------------------- canal


@pytest.mark.parametrize(("width", "category"), [(7.5, "absolute"), (11.5, "relative"), (16.0, "normal")])
def test_canal_diameter_and_stenosis(width: float, category: str) -> None:
    result = measure_sagittal(spine(canal_mm=width), (1.0, 1.0))
    for upper, lower in zip(LUMBAR[:-1], LUMBAR[1:]):
        level = f"{upper}-{lower}"
        assert value(result, level, ms.CANAL_AP_DIAMETER) == pytest.approx(width, abs=tolerance((1.0, 1.0), 90.0))
        assert result.category(level, ms.CENTRAL_STENOSIS).value == category  # type: ignore[union-attr]


def test_canal_rotated_and_anisotropic() -> None:
    spacing = (0.5, 1.0)
    result = measure_sagittal(spine(spacing, canal_mm=11.5, rotate_deg=20.0), spacing)
    assert value(result, "L3-L4", ms.CANAL_AP_DIAMETER) == pytest.approx(11.5, abs=tolerance(spacing, 110.0))


# --------------------------------------------------------------------------- lordosis

TILTS = (-10.0, -3.0, 4.0, 11.0, 18.0, 30.0)  # L1 ... S1: 40 degrees of lordosis


@pytest.mark.parametrize("rotate", [0.0, 20.0])
def test_lordosis_from_s1_body(rotate: float) -> None:
    spacing = (0.5, 0.5)
    result = measure_sagittal(spine(spacing, tilts=TILTS, rotate_deg=rotate), spacing)
    m = result.get("L1-S1", ms.LORDOSIS)
    assert m is not None and "S1 body" in m.basis and len(m.points) == 4
    # two endplate lines fitted through 24 mm staircases of half-pixel steps: within a degree each
    assert m.value == pytest.approx(TILTS[-1] - TILTS[0], abs=2.0)
    for level in LUMBAR[:-1]:
        assert value(result, level, ms.MIDDLE_BODY_HEIGHT) == pytest.approx(HEIGHT, abs=tolerance(spacing, 45.0))


def test_lordosis_from_lumbosacral_disc_without_s1() -> None:
    spacing = (0.5, 0.5)
    labels = spine(spacing, tilts=TILTS)
    labels[labels == ms.VERTEBRA_LABELS["S1"]] = 0
    result = measure_sagittal(labels, spacing)
    m = result.get("L1-S1", ms.LORDOSIS)
    assert m is not None and "L5-S1 disc" in m.basis
    assert m.value == pytest.approx(TILTS[-1] - TILTS[0], abs=2.0)
    assert result.get("L5-S1", ms.SLIP) is None  # no S1 corners to slip on


def test_kyphosis_is_negative() -> None:
    spacing = (0.5, 0.5)
    result = measure_sagittal(spine(spacing, tilts=[-t for t in TILTS]), spacing)
    assert value(result, "L1-S1", ms.LORDOSIS) == pytest.approx(-(TILTS[-1] - TILTS[0]), abs=2.0)


# --------------------------------------------------------------------------- what the mask allows


def test_missing_level_is_skipped() -> None:
    labels = spine(canal_mm=14.0)
    labels[labels == ms.VERTEBRA_LABELS["L3"]] = 0
    result = measure_sagittal(labels, (1.0, 1.0))
    assert result.get("L3", ms.MIDDLE_BODY_HEIGHT) is None
    assert result.get("L2-L3", ms.SLIP) is None and result.get("L3-L4", ms.SLIP) is None
    # the discs next to it still have a body on their other side
    assert value(result, "L2-L3", ms.DISC_HEIGHT_MIDDLE) == pytest.approx(GAP, abs=tolerance((1.0, 1.0)))
    assert value(result, "L4", ms.MIDDLE_BODY_HEIGHT) == pytest.approx(HEIGHT, abs=tolerance((1.0, 1.0)))
    assert value(result, "L1-S1", ms.LORDOSIS) == pytest.approx(0.0, abs=2.0)


def test_structure_cut_by_the_edge_is_not_measured() -> None:
    labels = spine()
    rows = np.nonzero(labels == ms.VERTEBRA_LABELS["L1"])[0]
    cut = labels[(rows.min() + rows.max()) // 2:]
    result = measure_sagittal(cut, (1.0, 1.0))
    assert result.get("L1", ms.ANTERIOR_BODY_HEIGHT) is None
    assert any(n.startswith("L1:") for n in result.notes)
    assert value(result, "L2", ms.MIDDLE_BODY_HEIGHT) == pytest.approx(HEIGHT, abs=tolerance((1.0, 1.0)))


def test_stray_specks_are_ignored() -> None:
    labels = spine(canal_mm=14.0)
    clean = measure_sagittal(labels, (1.0, 1.0))
    specks = labels.copy()
    specks[2:4, 2:4] = ms.VERTEBRA_LABELS["L3"]
    specks[-4:-2, 2:5] = disc_label("L3-L4")
    specks[5, -5] = CANAL_LABEL
    rows, cols = np.nonzero(labels == ms.VERTEBRA_LABELS["L2"])
    specks[rows.min() + 5, cols.min() - 4] = ms.VERTEBRA_LABELS["L2"]  # a speck just in front of L2
    noisy = measure_sagittal(specks, (1.0, 1.0))
    assert noisy.to_rows() == clean.to_rows()


def test_rows_for_csv() -> None:
    result = measure_sagittal(spine(canal_mm=14.0), (1.0, 1.0))
    rows = result.to_rows()
    assert all(set(r) == {"level", "measurement", "unit", "value"} for r in rows)
    names = {r["measurement"] for r in rows}
    assert set(ms.MEASUREMENT_NAMES) <= names and set(ms.CATEGORY_VALUES) <= names
    assert {r["unit"] for r in rows} == {"mm", "%", "deg", "1", ""}
    levels = [r["level"] for r in rows if r["unit"] == "mm"]
    assert levels.index("L1") < levels.index("L1-L2") < levels.index("L2")  # cranial to caudal


def test_runs_match_every_sample_looked_up() -> None:
    # runs looks up few samples; it must give what looking up every one along the line gives
    spacing = np.array([0.5, 0.8])
    labels = spine(tuple(spacing), canal_mm=12.0, rotate_deg=20.0)
    labels = labels[: labels.shape[0] // 2]  # some structures cut by the edge
    rng = np.random.default_rng(0)
    for value in np.unique(labels)[1:]:
        shape = ms._Shape(labels == value, (0, 0), labels.shape, spacing)
        for _ in range(5):
            direction = rng.normal(size=2)
            direction /= np.linalg.norm(direction)
            origins = shape.centre + rng.uniform(-15, 15, size=(40, 2))
            for forward_only in (False, True):
                lo, hi = shape.runs(origins, direction, forward_only)
                reach = shape.reach(origins)
                t = np.arange(0.0 if forward_only else -reach, reach + shape.step / 2, shape.step)
                r = np.rint((origins[:, None, 0] + t * direction[0]) / spacing[0]).astype(int)
                c = np.rint((origins[:, None, 1] + t * direction[1]) / spacing[1]).astype(int)
                inb = (r >= 0) & (r < labels.shape[0]) & (c >= 0) & (c < labels.shape[1])
                inside = np.zeros(inb.shape, bool)
                inside[inb] = labels[r[inb], c[inb]] == value
                for i in range(len(origins)):
                    hits = np.flatnonzero(inside[i])
                    whole = (len(hits) and 0 < hits[0] and hits[-1] < len(t) - 1
                             and inb[i, hits[0] - 1] and inb[i, hits[-1] + 1])
                    if whole:
                        assert (lo[i], hi[i]) == (t[hits[0]] - shape.step / 2, t[hits[-1]] + shape.step / 2)
                    else:
                        assert np.isnan(lo[i]) and np.isnan(hi[i])


def test_a_canal_pinched_in_two_is_measured_on_both_sides():
    """Synthetic stack: a severe stenosis cuts the canal; the levels above and below keep their diameters."""
    m = np.zeros((192, 160), np.int16)
    names = ["L1", "L2", "L3", "L4", "L5"]
    for i, name in enumerate(names):
        r0 = 10 + i * 30
        m[r0:r0 + 22, 50:90] = ms.VERTEBRA_LABELS[name]
        m[r0 + 22:r0 + 30, 52:88] = disc_label(f"{name}-{names[i + 1]}" if i + 1 < len(names) else "L5-S1")
    m[10:170, 96:108] = CANAL_LABEL
    m[92:100, 96:108] = 0  # pinched shut at L3-L4
    out = measure_sagittal(m, (1.0, 1.0))
    for level in ("L1-L2", "L4-L5"):
        d = out.get(level, ms.CANAL_AP_DIAMETER)
        assert d is not None and abs(d.value - 12.0) <= 1.5, (level, d)
