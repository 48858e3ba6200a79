"""Geometry joins between series: a point in patient mm onto the images of another series.

The level localizer gives points on the sagittal series; the classifiers need the
image of another series that passes through (or near) each point. Everything here
is numpy on :class:`dicom_io.volume.Volume` affines (``affine @ [column, row, slice,
1]`` = patient LPS mm), so it is testable with synthetic volumes and no DICOM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from dicom_io.volume import Volume
from models.crops import snap_to_plane


@dataclass(frozen=True)
class SlicePick:
    """The image of a volume nearest a point, and where the point falls on it.

    ``distance_mm`` is the signed distance from the image plane to the point
    along the slice normal; ``snapped_mm`` is the point moved onto the plane
    (its orthogonal projection), so a crop centred there lies in that image.
    ``row``/``column`` are the point's pixel coordinates on the image;
    ``inside`` says whether they fall within the image.
    """

    volume_index: int
    slice_index: int
    distance_mm: float
    row: float
    column: float
    inside: bool
    snapped_mm: tuple[float, float, float]


def nearest_slice(volume: Volume, point_mm: Sequence[float], volume_index: int = 0) -> SlicePick:
    """Pick the image of ``volume`` whose plane is nearest ``point_mm``.

    Slices are taken from the affine (uniform spacing along the slice vector),
    and the index is clipped to the stack, so a point beyond either end picks
    the end image with its true, large distance.

    Parameters
    ----------
    volume
        The stack to search.
    point_mm
        Point in patient coordinates (LPS, mm).
    volume_index
        Copied into the result, for callers that search several stacks.

    Returns
    -------
    SlicePick

    Raises
    ------
    ValueError
        If ``point_mm`` is not three finite numbers.
    """
    p = np.asarray(point_mm, dtype=float).reshape(-1)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise ValueError(f"point_mm: expected 3 finite numbers, got {point_mm!r}")
    n_slices, n_rows, n_cols = volume.array.shape
    snapped, k, dist = snap_to_plane(volume.affine, n_slices, p)
    # In-plane pixel position of the projected point on image k.
    c2, r2, _ = volume.patient_to_voxel(snapped)[0]
    inside = bool(-0.5 <= r2 <= n_rows - 0.5 and -0.5 <= c2 <= n_cols - 0.5)
    return SlicePick(
        volume_index=volume_index,
        slice_index=k,
        distance_mm=dist,
        row=float(r2),
        column=float(c2),
        inside=inside,
        snapped_mm=(float(snapped[0]), float(snapped[1]), float(snapped[2])),
    )


def pick_slice(
    volumes: Sequence[Volume], point_mm: Sequence[float], tolerance_mm: float
) -> tuple[SlicePick | None, str]:
    """The image nearest ``point_mm`` over several stacks, within a tolerance.

    Angled axial acquisitions often come as one stack per disc, so every stack
    is searched and the image with the smallest plane distance whose in-plane
    position falls inside the image wins.

    Parameters
    ----------
    volumes
        Candidate stacks (may be empty).
    point_mm
        Point in patient mm.
    tolerance_mm
        Largest accepted distance between the point and the image plane.

    Returns
    -------
    (SlicePick or None, str)
        The chosen image, or None with the reason none was accepted (the
        nearest distance found, or that the point falls outside every image).

    Raises
    ------
    ValueError
        If ``tolerance_mm`` is not positive.
    """
    if not tolerance_mm > 0:
        raise ValueError(f"tolerance_mm: must be > 0, got {tolerance_mm!r}")
    picks = [nearest_slice(v, point_mm, i) for i, v in enumerate(volumes)]
    if not picks:
        return None, "no stack to search"
    inside = [p for p in picks if p.inside]
    if not inside:
        return None, "the point falls outside every image"
    best = min(inside, key=lambda p: abs(p.distance_mm))
    if abs(best.distance_mm) > tolerance_mm:
        return None, (
            f"nearest image is {abs(best.distance_mm):.1f} mm from the point "
            f"(tolerance {tolerance_mm:g} mm)"
        )
    return best, ""


def sagittal_reformat(
    volume: Volume, inplane_mm: float = 1.0, slice_mm: float = 2.0, width_mm: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a stack (an axial CT) into sagittal images, with their affine.

    The output follows the usual sagittal DICOM orientation: image columns run
    anterior to posterior (+y), image rows superior to inferior (-z), and the
    slices step from the patient's left to the right (-x), which keeps the
    affine right-handed like a sagittal acquisition. The grid covers the source
    volume's extent; voxels outside it are 0.

    Parameters
    ----------
    volume
        Source stack with a valid affine.
    inplane_mm
        Pixel size of the reformatted images (isotropic in-plane).
    slice_mm
        Distance between reformatted images.
    width_mm
        Left-right extent of the reformat, centred on the volume (None: all of
        it). The spine lies near the middle of a lumbar CT, and images far from
        it only cost time.

    Returns
    -------
    (array, affine)
        ``array[slice, row, column]`` (float32) and its 4x4 affine in the
        :class:`~dicom_io.volume.Volume` convention.

    Raises
    ------
    ValueError
        If a spacing is not positive.
    """
    if not inplane_mm > 0:
        raise ValueError(f"inplane_mm: must be > 0, got {inplane_mm!r}")
    if not slice_mm > 0:
        raise ValueError(f"slice_mm: must be > 0, got {slice_mm!r}")
    if width_mm is not None and not width_mm > 0:
        raise ValueError(f"width_mm: must be > 0, got {width_mm!r}")
    rdir = np.array([0.0, 1.0, 0.0])
    cdir = np.array([0.0, 0.0, -1.0])
    normal = np.cross(rdir, cdir)  # (-1, 0, 0): patient left to right
    n_s, n_r, n_c = volume.array.shape
    corners = np.array(
        [[c, r, s] for c in (-0.5, n_c - 0.5) for r in (-0.5, n_r - 0.5) for s in (-0.5, n_s - 0.5)]
    )
    pts = volume.voxel_to_patient(corners)
    lo = np.array([pts @ rdir, pts @ cdir, pts @ normal]).min(axis=1)
    hi = np.array([pts @ rdir, pts @ cdir, pts @ normal]).max(axis=1)
    if width_mm is not None and hi[2] - lo[2] > width_mm:
        mid = (hi[2] + lo[2]) / 2.0
        lo[2], hi[2] = mid - width_mm / 2.0, mid + width_mm / 2.0
    step = np.array([inplane_mm, inplane_mm, slice_mm])
    shape = np.maximum(1, np.floor((hi - lo) / step).astype(int))  # (cols, rows, slices)
    start = lo + (hi - lo - (shape - 1) * step) / 2.0  # centre the grid on the extent
    affine = np.eye(4)
    affine[:3, 0] = rdir * inplane_mm
    affine[:3, 1] = cdir * inplane_mm
    affine[:3, 2] = normal * slice_mm
    affine[:3, 3] = start[0] * rdir + start[1] * cdir + start[2] * normal
    # Output voxel -> source voxel in one matrix; resample image by image to bound memory.
    to_src = np.linalg.inv(volume.affine) @ affine
    n_cols, n_rows, n_slices = (int(x) for x in shape)
    rr, cc = np.mgrid[0:n_rows, 0:n_cols]
    src_arr = np.asarray(volume.array, np.float32)
    out = np.empty((n_slices, n_rows, n_cols), np.float32)
    for k in range(n_slices):
        vox = np.stack([cc.ravel(), rr.ravel(), np.full(rr.size, k)]).astype(float)
        src = to_src[:3, :3] @ vox + to_src[:3, 3:4]  # (column, row, slice) in the source
        out[k] = ndimage.map_coordinates(src_arr, src[::-1], order=1, cval=0.0).reshape(
            n_rows, n_cols
        )
    return out, affine
