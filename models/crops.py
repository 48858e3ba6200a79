"""Per-level crops from a volume, and the inverse map for heatmaps.

Shared by training (crops from synthetic or real volumes) and inference (the
worker's pipeline), so both see exactly the same pixels. Geometry only: numpy and
scipy, no pydicom, no torch.

Conventions: a volume array is indexed ``[slice, row, column]`` and its 4x4
``affine`` maps ``(column, row, slice, 1)`` to patient millimetres (DICOM LPS:
+x patient left, +y posterior, +z superior). A crop is a square plane of
``size_mm`` centred on ``center_mm`` whose output column axis runs along unit
vector ``u`` and whose row axis runs along unit vector ``v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Patient-left unit vector in LPS.
LEFT = np.array([1.0, 0.0, 0.0])


@dataclass(frozen=True)
class CropSpec:
    """How one task crops around a disc level.

    ``plane`` is ``"sagittal"`` or ``"axial"``: the crop lies in the plane of the
    source series' images. ``lateral_mm`` moves the centre towards the patient's
    left (positive) or right (negative) before cropping; ``posterior_mm`` moves
    it posteriorly. ``mirror_right`` flips right-side crops left-right so one
    model sees every side as if it were the left. ``upright`` (sagittal planes)
    samples the crop with rows running inferior and columns posterior within the
    image plane, whatever way round the series is stored, so upper and lower
    endplates and the anterior and posterior disc margins always sit the same way.
    """

    task: str
    plane: str
    size_mm: float
    lateral_mm: float = 0.0
    posterior_mm: float = 0.0
    mirror_right: bool = False
    upright: bool = False


#: Crop specifications per task (keyed by the model package's task name).
CROP_SPECS: dict[str, CropSpec] = {
    "mr_disc": CropSpec("mr_disc", "axial", size_mm=64.0),
    # The canal and foramina lie 20-28 mm behind the disc centre: shift those crops
    # posteriorly so the structure graded sits in the middle, with the disc margin in view.
    "mr_canal": CropSpec("mr_canal", "sagittal", size_mm=64.0, posterior_mm=14.0),
    "mr_foramen": CropSpec(
        "mr_foramen", "sagittal", size_mm=48.0, lateral_mm=18.0, posterior_mm=16.0, mirror_right=True
    ),
    "mr_subarticular": CropSpec(
        "mr_subarticular", "axial", size_mm=40.0, lateral_mm=10.0, posterior_mm=12.0, mirror_right=True
    ),
    "ct_disc": CropSpec("ct_disc", "axial", size_mm=100.0),
    # paper A's level classifier sees the same axial field as the disc grader
    "ct_level": CropSpec("ct_level", "axial", size_mm=100.0),
    # Disc grading reads the disc with both endplates and a strip of each vertebral body
    # (Modic changes, endplate defects), and the posterior margin (herniation, bulging).
    "mr_disc_grading": CropSpec("mr_disc_grading", "sagittal", size_mm=56.0, upright=True),
}


@dataclass(frozen=True)
class CropGeometry:
    """Where a crop came from: enough to map its pixels back to any image."""

    center_mm: tuple[float, float, float]
    u: tuple[float, float, float]  # output column direction (unit, patient mm)
    v: tuple[float, float, float]  # output row direction (unit, patient mm)
    size_mm: float
    out_px: int
    mirrored: bool = False

    @property
    def pixel_mm(self) -> float:
        return self.size_mm / self.out_px

    def crop_to_patient(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Crop pixel coordinates (unmirrored) -> (N, 3) patient mm."""
        half = (self.out_px - 1) / 2.0
        c = np.asarray(self.center_mm)
        return (
            c[None, :]
            + ((np.ravel(cols) - half) * self.pixel_mm)[:, None] * np.asarray(self.u)[None, :]
            + ((np.ravel(rows) - half) * self.pixel_mm)[:, None] * np.asarray(self.v)[None, :]
        )


def slice_axes(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit (row direction, column direction, slice normal) of a volume's images.

    "Row direction" is the direction along which the column index increases
    (DICOM's first ImageOrientationPatient vector), "column direction" is the one
    along which the row index increases.
    """
    a = np.asarray(affine, dtype=float)
    rdir = a[:3, 0] / np.linalg.norm(a[:3, 0])
    cdir = a[:3, 1] / np.linalg.norm(a[:3, 1])
    normal = np.cross(rdir, cdir)
    return rdir, cdir, normal


def extract_crop(
    array: np.ndarray,
    affine: np.ndarray,
    center_mm: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    size_mm: float,
    out_px: int,
    mirror: bool = False,
) -> tuple[np.ndarray, CropGeometry]:
    """Sample a square crop (trilinear, zero outside the volume).

    Returns the float32 crop of shape ``(out_px, out_px)`` and its geometry.
    """
    if size_mm <= 0 or out_px < 2:
        raise ValueError(f"size_mm/out_px: need size_mm > 0 and out_px >= 2, got {size_mm}, {out_px}")
    u = np.asarray(u, float) / np.linalg.norm(u)
    v = np.asarray(v, float) / np.linalg.norm(v)
    geom = CropGeometry(
        tuple(map(float, center_mm)), tuple(map(float, u)), tuple(map(float, v)),
        float(size_mm), int(out_px), bool(mirror),
    )
    rr, cc = np.mgrid[0:out_px, 0:out_px]
    pts = geom.crop_to_patient(rr, cc)
    inv = np.linalg.inv(np.asarray(affine, float))
    vox = (inv[:3, :3] @ pts.T).T + inv[:3, 3]  # (column, row, slice)
    coords = np.stack([vox[:, 2], vox[:, 1], vox[:, 0]])  # -> [slice, row, column]
    crop = ndimage.map_coordinates(np.asarray(array, np.float32), coords, order=1, cval=0.0)
    crop = crop.reshape(out_px, out_px).astype(np.float32)
    if mirror:
        crop = crop[:, ::-1].copy()
    return crop, geom


def crop_for_level(
    array: np.ndarray,
    affine: np.ndarray,
    disc_mm: np.ndarray,
    spec: CropSpec,
    out_px: int,
    side: str | None = None,
) -> tuple[np.ndarray, CropGeometry]:
    """Crop for ``spec`` around a disc point, on the volume's own image plane.

    ``side`` is ``"L"``, ``"R"`` or None (midline). The crop's axes are the
    volume's image row and column directions, so a sagittal crop looks like the
    sagittal image and an axial crop like the axial image; with ``spec.upright``
    they are the in-plane posterior and inferior directions instead.

    Raises
    ------
    ValueError
        If ``spec.upright`` is set and the image plane holds no inferior direction.
    """
    rdir, cdir, normal = slice_axes(affine)
    if spec.upright:
        inferior = np.array([0.0, 0.0, -1.0])
        cdir = inferior - (inferior @ normal) * normal
        if np.linalg.norm(cdir) < 1e-6:
            raise ValueError("spec: an upright crop needs an image plane with a superior-inferior direction")
        cdir = cdir / np.linalg.norm(cdir)
        rdir = np.cross(normal, cdir)
        if rdir[1] < 0:  # columns run posterior
            rdir = -rdir
    center = offset_point(disc_mm, spec, side)
    mirror = bool(spec.mirror_right and side == "R")
    return extract_crop(array, affine, center, rdir, cdir, spec.size_mm, out_px, mirror=mirror)


def offset_point(disc_mm: np.ndarray, spec: CropSpec, side: str | None = None) -> np.ndarray:
    """The crop centre of ``spec`` for a disc point: moved laterally (``side`` L/R) and posteriorly."""
    if side not in (None, "L", "R"):
        raise ValueError(f"side: must be 'L', 'R' or None, got {side!r}")
    sign = {None: 0.0, "L": 1.0, "R": -1.0}[side]
    return np.asarray(disc_mm, float) + sign * spec.lateral_mm * LEFT + spec.posterior_mm * np.array([0.0, 1.0, 0.0])


def snap_to_plane(affine: np.ndarray, n_slices: int, point_mm: np.ndarray) -> tuple[np.ndarray, int, float]:
    """The image plane of a stack nearest a point: ``(point projected onto it, slice index, signed distance)``.

    The index is the point's slice coordinate rounded and clipped to the stack,
    so a point beyond either end picks the end image with its true, large distance.
    """
    a = np.asarray(affine, float)
    p = np.asarray(point_mm, float).reshape(3)
    inv = np.linalg.inv(a)
    k = int(np.clip(np.rint((inv[:3, :3] @ p + inv[:3, 3])[2]), 0, n_slices - 1))
    _, _, normal = slice_axes(a)
    origin_k = a[:3, :3] @ np.array([0.0, 0.0, float(k)]) + a[:3, 3]
    dist = float(np.dot(p - origin_k, normal))
    return p - dist * normal, k, dist


def crop_at_disc(
    array: np.ndarray,
    affine: np.ndarray,
    disc_mm: np.ndarray,
    spec: CropSpec,
    out_px: int,
    side: str | None = None,
) -> tuple[np.ndarray, CropGeometry, int, float]:
    """The one crop path of training and inference: offset, snap, crop.

    The crop centre (the disc point plus the spec's offsets) is moved along the
    slice normal onto the nearest image plane, so the crop is exactly that
    image's pixels resampled (and its heatmap maps back onto that image); the
    crop is then cut as :func:`crop_for_level` does and resized to ``out_px``.

    Returns
    -------
    (crop, geometry, slice index, distance mm from the offset point to that plane)
    """
    a = np.asarray(array)
    target = offset_point(disc_mm, spec, side)
    snapped, k, dist = snap_to_plane(affine, a.shape[0], target)
    crop, geom = crop_for_level(a, affine, np.asarray(disc_mm, float) + (snapped - target), spec, out_px, side)
    return crop, geom, k, dist


def crop_to_image(
    heatmap: np.ndarray,
    geom: CropGeometry,
    image_affine: np.ndarray,
    slice_index: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Map a crop-pixel heatmap onto one source image (rows x columns).

    ``image_affine`` is the volume affine the image belongs to and
    ``slice_index`` the image's slice; each source pixel is projected
    orthogonally onto the crop plane. Pixels outside the crop get 0.
    """
    h = np.asarray(heatmap, np.float32)
    if h.shape != (geom.out_px, geom.out_px):
        raise ValueError(f"heatmap: shape {h.shape} does not match crop {geom.out_px}x{geom.out_px}")
    if geom.mirrored:
        h = h[:, ::-1]
    rows, cols = shape
    rr, cc = np.mgrid[0:rows, 0:cols]
    vox = np.stack([cc.ravel(), rr.ravel(), np.full(rr.size, float(slice_index))], axis=1)
    a = np.asarray(image_affine, float)
    pts = (a[:3, :3] @ vox.T).T + a[:3, 3]
    d = pts - np.asarray(geom.center_mm)[None, :]
    half = (geom.out_px - 1) / 2.0
    cj = d @ np.asarray(geom.u) / geom.pixel_mm + half
    ci = d @ np.asarray(geom.v) / geom.pixel_mm + half
    out = ndimage.map_coordinates(h, np.stack([ci, cj]), order=1, cval=0.0)
    return out.reshape(rows, cols).astype(np.float32)
