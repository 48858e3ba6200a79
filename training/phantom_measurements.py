"""Spine measurements on the synthetic phantoms against the generator's truth.

``python -m training.phantom_measurements --seeds 0-9 --package DIR --out OUT`` renders
the sagittal T2 series of each phantom, runs the level localizer and the segmentation
package on it as the worker does (:func:`worker.analysis_spine.measure_spine`: midline
slice from the located points, :func:`models.segmentation.source_labels`,
:func:`models.segmentation.measure_image`) and compares every measurement with the
truth of the generator (:mod:`dicom_io.phantom`) on the same image. It writes
``phantom_measurements.csv`` (``seed, level, measurement, unit, measured, truth``) and
``phantom_measurements.json`` (per measurement n, MAE, bias, ICC(A,1) from
:func:`training.segmentation_eval.agreement`, and how many truths were measured).
With ``--model-free`` the segmenter is replaced by the generator's own structures
rasterised on the image (:func:`truth_labels`), which checks
:func:`models.measurements.measure_sagittal` alone.

Phantoms
--------
:func:`phantom_anatomy`: the anatomy of the seed's demo MR study (findings drawn as
:func:`dicom_io.phantom.write_demo_study` draws them), and an anterolisthesis of L4 or
L5 by 7-12 mm on every third seed (``seed % 3 == 2``), so that slips occur.

Truth
-----
Truth is taken on the plane of the measured image (the phantom's spine is a few mm off
the true midline and a little rotated, and the image is where the measurement was
taken). Lengths are the runs of the generator's own tissue labels
(:func:`dicom_io.phantom.label_map`, sampled every :data:`TRUTH_STEP_MM`) along lines
set by the generator's geometry: each body's cranial axis and AP direction from its
``frame`` projected onto the plane; a disc's axis is the bisector of its two bodies'
axes (the measurement's disc axis is perpendicular to the mean of the adjacent
endplates). Body tissue is cortex and marrow, disc tissue annulus, nucleus and
herniation, canal tissue the thecal sac (CSF and the roots or cord in it).

Body heights (T10-L5)
    Run of body tissue along the body's axis at 15, 50 and 85 % of its AP extent through
    its centroid, the measurement's positions. This is ``Vertebra.height`` less the
    generator's endplate concavity (0.8 mm per endplate at the centre, none at the rim:
    about 1.6 mm less in the middle, 0.8-1.2 mm less at 15 and 85 %); the AP extent at
    the centroid is 0.94 ``Vertebra.depth`` (the body's waist). Wedge ratio,
    biconcavity ratio and height loss follow from the three truths as the measurement
    derives them.
Disc heights
    Run of disc tissue along the disc axis at 15, 50 and 85 % of the disc's AP extent
    through its centre (``Disc.depth``, plus a bulge both ways, plus a central
    herniation behind). The disc fills the space between the two bodies, so this is
    the distance between their endplates there: ``Disc.height`` (between the endplate
    centres) plus both concavities in the middle (about +1.6 mm) and, away from the
    middle, the opening angle of the segment times the AP offset. ``Disc.wedge`` (tan of
    0.8 times that angle) only shapes the painted disc, which the bodies overlap, so it
    is not the visible wedge. On a slipped segment ``Disc.height`` is the oblique
    distance between the shifted endplate centres; the run along the axis is not.
    Whether a segmenter counts herniated or bulging material as disc may differ.
Canal AP diameter
    First run of thecal sac tissue behind the disc centre along the disc's AP direction
    (the measurement's line). The generator narrows the sac at the disc by
    ``sqrt(Disc.canal_area)`` (moderate stenosis keeps 40-60 %, severe 10-22 % of its
    area) and not the bony canal, so the truth is the sac: about
    ``(Disc.canal_depth - 4.4) * sqrt(Disc.canal_area)`` mm, less on an image a few mm
    off the spine's midline (the sac is an ellipse across; up to 1.5 mm on the narrower
    thoracic canal) and where a central herniation reaches into it. A segmentation that includes the epidural fat reads up
    to 4-5 mm more. Not defined on the slipped segment (the shifted arch and body
    narrow the canal irregularly there) nor where a subarticular stenosis is painted
    (the generator fills the lateral recess to within 10-55 % of the sac's half-width
    of the midline, so an image a millimetre or two off the midline cuts the sac).
Slip
    Posterior-inferior corner of the upper body against the posterior-superior corner of
    the lower, along the lower body's superior endplate, positive anterior: the corners
    are the endplate centres moved half the body's depth along its AP direction. Defined
    for every pair (a few tenths of a mm to about a mm without a slip, from the segment's
    angle and the bodies' different depths; the generator's ``slip_mm`` on the slipped
    level, which the generator applies along the patient's AP axis, so along the sloping
    endplate it is ``slip_mm`` times the cosine of the endplate's slope). The measured walls are fitted over the middle height, where the waist sets
    them about 0.05 of half the depth inside the corners; that moves both corners alike.
    Slip percent is over ``Vertebra.depth`` of the lower body (the measurement's endplate
    length between its corners is about 5 % shorter).
Lordosis L1-S1
    Angle between the L1 and S1 axes projected onto the plane, signed as the
    measurement signs it; close to the anatomy's ``lordosis_deg``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dicom_io.phantom import (
    Anatomy,
    Tissue,
    XrayFindings,
    label_map,
    make_anatomy,
    random_findings,
    render_mr,
)
from models import measurements as M
from training.segmentation_eval import agreement

#: Sampling step of the truth lines (mm).
TRUTH_STEP_MM = 0.02
#: How far a truth line reaches either side of its point (mm).
_REACH_MM = 40.0
_BODY = (Tissue.CORTEX, Tissue.MARROW)
_DISC = (Tissue.ANNULUS, Tissue.NUCLEUS, Tissue.NUCLEUS_DEGENERATED, Tissue.NUCLEUS_DESICCATED, Tissue.HERNIATION)
_SAC = (Tissue.CSF, Tissue.NERVE)
#: CSV columns.
FIELDS = ("seed", "level", "measurement", "unit", "measured", "truth")


def phantom_anatomy(seed: int) -> Anatomy:
    """The seed's phantom: the demo MR study's findings; an L4 or L5 anterolisthesis when ``seed % 3 == 2``."""
    findings = random_findings(np.random.default_rng([int(seed), 0xF1D]))
    xray = XrayFindings("spondylolisthesis" if seed % 3 == 2 else "normal")
    return make_anatomy(seed, findings, xray=xray)


class _Plane:
    """The plane of one image of a stack: projects points and directions onto it."""

    def __init__(self, affine: np.ndarray, index: int) -> None:
        a = np.asarray(affine, float)
        self.point = a[:3, :3] @ np.array([0.0, 0.0, float(index)]) + a[:3, 3]
        self.normal = a[:3, 2] / np.linalg.norm(a[:3, 2])

    def point_on(self, p: np.ndarray) -> np.ndarray:
        return p - ((p - self.point) @ self.normal) * self.normal

    def direction(self, d: np.ndarray) -> np.ndarray:
        d = d - (d @ self.normal) * self.normal
        return d / np.linalg.norm(d)

    def across(self, axis: np.ndarray, towards: np.ndarray) -> np.ndarray:
        """Unit vector in the plane perpendicular to ``axis``, on the side of ``towards``."""
        d = np.cross(self.normal, axis)
        return d if d @ towards >= 0 else -d


def _run(anatomy: Anatomy, origin: np.ndarray, direction: np.ndarray, tissues: Iterable[int],
         forward: bool = False) -> tuple[float, float] | None:
    """Extent ``(start, end)`` in mm from ``origin`` of the run of ``tissues`` along ``direction``.

    The run holding ``origin``, or with ``forward`` the first run ahead of it; None if there is none.
    """
    n = int(round(2 * _REACH_MM / TRUTH_STEP_MM)) + 1
    helper = np.array([1.0, 0.0, 0.0]) if abs(direction[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    side = np.cross(direction, helper)
    side /= np.linalg.norm(side)
    aff = np.eye(4)
    aff[:3, 0] = side * TRUTH_STEP_MM
    aff[:3, 1] = direction * TRUTH_STEP_MM
    aff[:3, 2] = np.cross(side, direction)
    aff[:3, 3] = origin - direction * _REACH_MM
    inside = np.isin(label_map(anatomy, (1, n, 1), aff)[0, :, 0], list(tissues))
    mid = n // 2
    if forward:
        ahead = np.flatnonzero(inside[mid:])
        if not len(ahead):
            return None
        mid += int(ahead[0])
    elif not inside[mid]:
        return None
    lo, hi = mid, mid
    while lo > 0 and inside[lo - 1]:
        lo -= 1
    while hi < n - 1 and inside[hi + 1]:
        hi += 1
    if lo == 0 or hi == n - 1:
        return None
    # a run of k samples covers k steps (each sample stands for its own step)
    return (lo - mid - 0.5) * TRUTH_STEP_MM, (hi - mid + 0.5) * TRUTH_STEP_MM


def _heights(anatomy: Anatomy, centre: np.ndarray, axis: np.ndarray, ap: np.ndarray,
             tissues: Iterable[int]) -> list[float] | None:
    """Runs along ``axis`` at :data:`models.measurements.HEIGHT_FRACTIONS` of the AP extent through ``centre``."""
    tissues = tuple(tissues)
    depth = _run(anatomy, centre, ap, tissues)
    if depth is None:
        return None
    out = []
    for f in M.HEIGHT_FRACTIONS:
        run = _run(anatomy, centre + (depth[0] + f * (depth[1] - depth[0])) * ap, axis, tissues)
        if run is None:
            return None
        out.append(run[1] - run[0])
    return out


def _plain_sac(anatomy: Anatomy, disc: str) -> bool:
    """Whether the sac at ``disc`` has a canal AP diameter truth (see the module docstring)."""
    f = anatomy.findings.get(disc)
    slipped = anatomy.variation.get("slip_mm", 0.0) > 0 and disc.startswith(anatomy.variation.get("slip_level", "") + "-")
    return not slipped and (f is None or f.subarticular_left == f.subarticular_right == "normal_mild")


def truth_measurements(anatomy: Anatomy, affine: np.ndarray, index: int) -> dict[tuple[str, str], float]:
    """The generator's truth on image ``index`` of a sagittal stack: ``(level, measurement) -> value``.

    See the module docstring for each definition; units are those of
    :data:`models.measurements.UNITS`.
    """
    plane = _Plane(affine, index)
    posterior = plane.direction(np.array([0.0, 1.0, 0.0]))
    caudal = plane.direction(np.array([0.0, 0.0, -1.0]))
    verts = anatomy.vertebrae
    axes = {n: plane.direction(v.frame[:, 2]) for n, v in verts.items()}
    aps = {n: plane.across(axes[n], v.frame[:, 1]) for n, v in verts.items()}
    out: dict[tuple[str, str], float] = {}
    for name, v in verts.items():
        if name == "S1" or name not in M.VERTEBRA_LABELS:
            continue
        hs = _heights(anatomy, plane.point_on(v.centroid), axes[name], aps[name], _BODY)
        if hs is None:
            continue
        ha, hm, hp = hs
        out.update({(name, M.ANTERIOR_BODY_HEIGHT): ha, (name, M.MIDDLE_BODY_HEIGHT): hm,
                    (name, M.POSTERIOR_BODY_HEIGHT): hp, (name, M.WEDGE_RATIO): ha / hp,
                    (name, M.BICONCAVITY_RATIO): hm / hp,
                    (name, M.BODY_HEIGHT_LOSS): 100.0 * (1.0 - min(hs) / max(hs))})
    for name, d in anatomy.discs.items():
        upper, lower = name.split("-")
        axis = plane.direction(axes[upper] + axes[lower])
        ap = plane.across(axis, posterior)
        centre = plane.point_on(d.centre)
        hs = _heights(anatomy, centre, axis, ap, _DISC)
        if hs is not None:
            out.update({(name, k): h for k, h in zip((M.DISC_HEIGHT_ANTERIOR, M.DISC_HEIGHT_MIDDLE,
                                                      M.DISC_HEIGHT_POSTERIOR), hs)})
        sac = _run(anatomy, centre, ap, _SAC, forward=True) if _plain_sac(anatomy, name) else None
        if sac is not None:
            out[(name, M.CANAL_AP_DIAMETER)] = sac[1] - sac[0]
        # corners: endplate centres moved half the depth towards posterior
        vu, vl = verts[upper], verts[lower]
        pi_upper = plane.point_on(vu.inferior_endplate) + vu.depth / 2 * aps[upper]
        ps_lower = plane.point_on(vl.superior_endplate) + vl.depth / 2 * aps[lower]
        slip = float((pi_upper - ps_lower) @ -aps[lower])
        out[(name, M.SLIP)] = slip
        out[(name, M.SLIP_PERCENT)] = 100.0 * slip / vl.depth
    if "L1" in verts and "S1" in verts:
        # the measurement's convention: (row down, column posterior) image axes, posterior endplate directions
        e1, e2 = ((aps[n] @ caudal, aps[n] @ posterior) for n in ("L1", "S1"))
        angle = np.degrees(np.arctan2(e1[0] * e2[1] - e1[1] * e2[0], e1[0] * e2[0] + e1[1] * e2[1]))
        out[(M.LORDOSIS_LEVEL, M.LORDOSIS)] = float(angle)
    return out


def truth_labels(anatomy: Anatomy, shape: tuple[int, int], affine: np.ndarray, index: int) -> np.ndarray:
    """The generator's bodies, discs and thecal sac on image ``index`` of a stack, as a label mask.

    Labels as in :mod:`models.measurements`: each body and disc is the connected region
    of its tissue (see the module docstring) holding its centre projected onto the image;
    the canal is every thecal sac pixel. Tissue is taken at the pixel centres of the
    image's mid-plane.
    """
    a = np.asarray(affine, float).copy()
    a[:3, 3] = a[:3, :3] @ np.array([0.0, 0.0, float(index)]) + a[:3, 3]
    tissue = label_map(anatomy, (1, int(shape[0]), int(shape[1])), a)[0]
    out = np.zeros(tissue.shape, np.int16)
    out[np.isin(tissue, _SAC)] = M.CANAL_LABEL
    inv = np.linalg.inv(a)
    rows, cols = np.mgrid[0:tissue.shape[0], 0:tissue.shape[1]]
    xyz = np.stack([cols, rows, np.zeros_like(rows)], axis=-1) @ a[:3, :3].T + a[:3, 3]
    for tissues, items in ((_BODY, [(n, v.centroid, M.VERTEBRA_LABELS.get(n), v) for n, v in anatomy.vertebrae.items()]),
                           (_DISC, [(n, d.centre, M.disc_label(n) if n in M.DISCS else None, None)
                                    for n, d in anatomy.discs.items()])):
        comp, _ = ndimage.label(np.isin(tissue, tissues))
        for _, centre, value, body in items:
            c, r = (inv[:3, :3] @ centre + inv[:3, 3])[:2]
            ri, ci = int(round(r)), int(round(c))
            if value is None or not (0 <= ri < comp.shape[0] and 0 <= ci < comp.shape[1]) or not comp[ri, ci]:
                continue
            region = comp == comp[ri, ci]
            if body is not None:
                # the body's own slab: S1 is 1.5 mm from S2, which pixels can bridge
                region &= np.abs((xyz - body.centroid) @ body.frame[:, 2]) <= body.height / 2 + 1.0
            out[region] = value
    return out


def compare(seed: int, measured: M.SagittalMeasurements | None,
            truth: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Rows ``seed, level, measurement, unit, measured, truth`` for every truth (``measured`` "" when not measured)."""
    rows = []
    for (level, name), t in truth.items():
        m = measured.get(level, name) if measured is not None else None
        rows.append({"seed": seed, "level": level, "measurement": name, "unit": M.UNITS[name],
                     "measured": round(m.value, 4) if m is not None else "", "truth": round(t, 4)})
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per measurement: :func:`training.segmentation_eval.agreement` of measured against truth, and ``n_truth``."""
    stats = agreement([{**r, "predicted": r["measured"], "reference": r["truth"]} for r in rows])
    for name, s in stats.items():
        s["n_truth"] = sum(1 for r in rows if r["measurement"] == name)
    return stats


def _midline(anatomy: Anatomy, array_shape: Sequence[int], affine: np.ndarray,
             points_mm: Sequence[np.ndarray] | None) -> int:
    from models.segmentation import midline_slice

    if points_mm is None:
        points_mm = [np.asarray(p, float) for p in anatomy.levels_mm().values()]
    return midline_slice(array_shape, affine, points_mm)


def model_free_rows(seed: int) -> list[dict[str, Any]]:
    """Measure the generator's own mask (:func:`truth_labels`) on the midline image of the seed's sagittal T2."""
    from models.segmentation import measure_image

    anatomy = phantom_anatomy(seed)
    series = render_mr(anatomy, "T2", "sagittal")
    n, h, w = series.array.shape
    mid = _midline(anatomy, series.array.shape, series.affine, None)
    measured = measure_image(truth_labels(anatomy, (h, w), series.affine, mid), series.affine)
    return compare(seed, measured, truth_measurements(anatomy, series.affine, mid))


def model_rows(seed: int, segmenter: Any, localizer: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The worker's path on the seed's sagittal T2 (localize, segment the midline image and its
    neighbours, name, measure the midline image) against the truth; rows and a short case record."""
    from models.segmentation import measure_image, source_labels

    anatomy = phantom_anatomy(seed)
    series = render_mr(anatomy, "T2", "sagittal")
    array, affine = series.array, series.affine
    n, h, w = array.shape
    located = localizer(np.asarray(array, np.float32), affine)
    points = {p.name: np.asarray(p.point_mm, float) for p in located.points}
    if not points:
        mid = _midline(anatomy, array.shape, affine, None)
        return compare(seed, None, truth_measurements(anatomy, affine, mid)), {
            "levels_refused": located.reason or "no level found", "slice": mid}
    mid = _midline(anatomy, array.shape, affine, list(points.values()))
    slices = [s for s in (mid - 1, mid, mid + 1) if 0 <= s < n]
    seg = segmenter.segment(array, affine, slices)
    inv = np.linalg.inv(np.asarray(affine, float)[:3, :3])
    vox = {k: inv @ (p - affine[:3, 3]) for k, p in points.items()}
    labels = source_labels(seg, slices.index(mid), (h, w), affine, vox)
    measured = measure_image(labels, affine)
    return compare(seed, measured, truth_measurements(anatomy, affine, mid)), {
        "slice": mid, "levels": sorted(points), "notes": list(measured.notes)}


def evaluate(seeds: Sequence[int], package: str | Path | None, levels_package: str | Path | None = None,
             progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and the report for ``seeds``: with ``package`` the worker's path, without it the model-free check."""
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    cases: dict[str, Any] = {}
    if package is None:
        for seed in tqdm(seeds, desc="phantoms", disable=not progress, leave=False):
            rows += model_free_rows(seed)
    else:
        from models.localizer import LevelLocalizer
        from models.package import find_package
        from models.segmentation import SpineSegmenter

        segmenter = SpineSegmenter.from_package(package)
        localizer = LevelLocalizer.from_package(levels_package or find_package("levels"))
        for seed in tqdm(seeds, desc="phantoms", disable=not progress, leave=False):
            r, case = model_rows(seed, segmenter, localizer)
            rows += r
            cases[str(seed)] = case
    report = {"seeds": list(seeds), "source": "model-free (generator masks)" if package is None else str(package),
              "measurements": summarize(rows), **({"cases": cases} if cases else {})}
    return rows, report


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"3"`` or ``"0,4,7-9"`` -> seeds.

    Raises
    ------
    ValueError
        If a part is not a number or a range ``a-b`` with ``a <= b``.
    """
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"seeds: expected numbers or ranges like 0-9, got {part!r}") from None
        if a > b:
            raise ValueError(f"seeds: empty range {part!r}")
        seeds += range(a, b + 1)
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write ``phantom_measurements.csv`` and ``.json`` to ``--out`` and print the summary."""
    parser = argparse.ArgumentParser(prog="python -m training.phantom_measurements", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0-9", help="phantom seeds, e.g. 0-9 or 0,3,5-7")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--package", help="spine_segmentation package (default: the shipped one)")
    how.add_argument("--model-free", action="store_true", help="measure the generator's own masks instead")
    parser.add_argument("--levels", help="level localizer package (default: the shipped one)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(str(exc))
    package = None
    if not args.model_free:
        from training.segmentation_eval import default_package

        package = args.package or default_package()
    rows, report = evaluate(seeds, package, args.levels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "phantom_measurements.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "phantom_measurements.json").write_text(json.dumps(report, indent=2))
    print(f"{len(seeds)} phantoms, {report['source']}")
    print(f"{'measurement':26s} {'unit':4s} {'n/truths':>9s} {'MAE':>7s} {'bias':>7s}")
    for name, s in report["measurements"].items():
        print(f"{name:26s} {s['unit']:4s} {s['n']:>4d}/{s['n_truth']:<4d} {s['mae']:7.2f} {s['bias']:+7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
