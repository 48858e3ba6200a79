"""Sagittal spine segmentation: vertebral bodies, intervertebral discs and the spinal canal.

A small U-Net (:class:`models.localizer.LevelNet` with raw class scores) reads single
sagittal images resampled onto an upright grid of :data:`PIXEL_MM` pixels (rows
superior to inferior, columns anterior to posterior; the localizer's
:class:`~models.localizer.SagittalGrid`) and gives per pixel the probabilities of
:data:`CLASSES`. It runs after level localization: :func:`label_levels` names each
connected body and disc by the nearest located level point, giving a mask in the
label scheme of :mod:`models.measurements` (bodies T9-L5 = 16-24, S1 = 26, discs
100 + the vertebra above, canal 200), which measures it.

Training and inference share :func:`prepare_image` (normalisation) and the grid,
so both see the same pixels. Numpy, scipy and torch only (no pydicom).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from models.errors import PackageError
from models.localizer import LevelNet, SagittalGrid, normalise, resample_slices
from models.measurements import CANAL_LABEL, VERTEBRA_LABELS, disc_label
from models.package import verify_package

#: Task name of the package.
TASK = "spine_segmentation"
#: Network output classes, in channel order.
CLASSES: tuple[str, ...] = ("background", "vertebral body", "disc", "spinal canal")
BODY, DISC, CANAL = 1, 2, 3
#: Pixel size of the segmentation grid (mm).
PIXEL_MM = 1.0
#: Levels whose measurements the product reports (the lumbar spine and its junctions); the
#: validation scores these only.
REPORTED_LEVELS: frozenset[str] = frozenset(
    {"T12", "L1", "L2", "L3", "L4", "L5", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1", "L1-S1"}
)
#: Smallest connected body or disc kept when naming levels (mm^2): smaller pieces are specks.
MIN_AREA_MM2 = 20.0
#: Farthest a level point may lie from a body or disc for it to name it (mm).
MAX_NAMING_MM = 12.0


def prepare_image(image: np.ndarray) -> np.ndarray:
    """One upright grid image -> network input ``[1, H, W]`` (1st..99.5th percentile of non-zero pixels to 0..1)."""
    return normalise(np.asarray(image, np.float32)[None])


def grid_for(shape: Sequence[int], affine: np.ndarray, pixel_mm: float = PIXEL_MM) -> SagittalGrid:
    """Upright grid of ``pixel_mm`` pixels covering a sagittal stack's whole field of view.

    Its size is the extent of the image's corners along the grid's axes, rounded up to a
    multiple of 16 (the network's pooling), so an upright image costs no padding.
    """
    a = np.asarray(affine, float)
    rows, cols = int(shape[1]), int(shape[2])
    grid = SagittalGrid.for_stack(shape, a, grid_shape=(16, 16), pixel_mm=pixel_mm)
    corners = np.array([[c, r, 0.0] for r in (-0.5, rows - 0.5) for c in (-0.5, cols - 0.5)])
    xyz = corners @ a[:3, :3].T + a[:3, 3] - np.asarray(grid.center_mm)
    half = np.abs(np.stack([xyz @ np.asarray(grid.v), xyz @ np.asarray(grid.u)])).max(axis=1)
    size = [int(np.ceil(2 * h / pixel_mm)) for h in half]
    size = [s + (-s) % 16 for s in size]
    return SagittalGrid.for_stack(shape, a, grid_shape=(size[0], size[1]), pixel_mm=pixel_mm)


@dataclass
class SagittalSegmentation:
    """Class probabilities of some images of a sagittal stack, on the upright grid.

    ``probs`` is ``[len(slices), len(CLASSES), H, W]``; ``slices`` are the source slice
    indices; ``grid`` maps grid pixels to patient mm.
    """

    probs: np.ndarray
    slices: list[int]
    grid: SagittalGrid

    def classes(self) -> np.ndarray:
        """Most probable class per pixel, ``[len(slices), H, W]`` uint8."""
        return np.argmax(self.probs, axis=1).astype(np.uint8)

    def to_source(self, index: int, source_shape: tuple[int, int], affine: np.ndarray) -> np.ndarray:
        """Class map of image ``index`` (into ``slices``) on the source image's own pixels.

        Probabilities are interpolated (bilinear) onto the source pixel centres before the
        most probable class is taken, so edges are placed to sub-pixel precision.
        """
        a = np.asarray(affine, float)
        rows, cols = np.mgrid[0:source_shape[0], 0:source_shape[1]]
        s = float(self.slices[index])
        xyz = (a[:3, :3] @ np.stack([cols.ravel(), rows.ravel(), np.full(cols.size, s)]).astype(float)).T + a[:3, 3]
        rq = self.grid.patient_to_pixel(xyz)
        coords = np.stack([rq[:, 0], rq[:, 1]])
        p = np.stack([ndimage.map_coordinates(self.probs[index, c], coords, order=1, cval=0.0, prefilter=False)
                      for c in range(self.probs.shape[1])])
        p[0] += 1e-6  # outside the grid: background
        return np.argmax(p, axis=0).reshape(source_shape).astype(np.uint8)


class SpineSegmenter:
    """Vertebral bodies, discs and spinal canal on sagittal images.

    Parameters
    ----------
    net : LevelNet
        Trained network with ``output="logits"`` and ``len(CLASSES)`` outputs.
    config : dict
        The package's ``config.json`` content.
    """

    def __init__(self, net: LevelNet, config: Mapping[str, Any] | None = None) -> None:
        if not isinstance(net, LevelNet) or net.output != "logits":
            raise TypeError("net: expected a LevelNet with output='logits'")
        self.net = net.eval()
        self._fast = net.fused()
        self.config = dict(config or {})
        pre = self.config.get("preprocessing", {})
        self.pixel_mm = float(pre.get("pixel_mm", PIXEL_MM))

    @classmethod
    def from_package(cls, path: str | Path) -> SpineSegmenter:
        """Load a verified ``spine_segmentation`` package.

        Raises
        ------
        PackageError
            If files are missing, the task differs, or the weights do not fit.
        """
        from safetensors.torch import load_file

        path = Path(path)
        config = verify_package(path)
        if config.task != TASK:
            raise PackageError(f"path: package task is {config.task!r}, expected {TASK!r}")
        cfg = config.to_dict()
        net = LevelNet(in_chans=1, out_chans=len(CLASSES), output="logits", **dict(cfg.get("model_kwargs", {})))
        state = {k: t.float() for k, t in load_file(str(path / config.weight_files[0])).items()}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise PackageError(f"path: weights do not fit the architecture: {exc}") from None
        return cls(net, cfg)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Prepared inputs ``[N, 1, H, W]`` -> class probabilities ``[N, len(CLASSES), H, W]``."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        with torch.inference_mode():
            return torch.softmax(self._fast(x), dim=1).numpy()

    def segment(self, array: np.ndarray, affine: np.ndarray, slices: Sequence[int]) -> SagittalSegmentation:
        """Segment the given images of a sagittal stack (``array[slice, row, column]``, affine to patient mm)."""
        grid = grid_for(array.shape, affine, self.pixel_mm)
        imgs = resample_slices(array, affine, grid, list(slices))
        x = np.stack([prepare_image(im) for im in imgs])
        return SagittalSegmentation(self.predict(x), [int(s) for s in slices], grid)


def midline_slice(array_shape: Sequence[int], affine: np.ndarray, points_mm: Sequence[np.ndarray]) -> int:
    """Source slice nearest the median slice position of the located level points (the midline)."""
    a = np.asarray(affine, float)
    if not len(points_mm):
        return int(array_shape[0]) // 2
    vox = np.linalg.solve(a[:3, :3], (np.asarray(points_mm, float) - a[:3, 3]).T).T
    return int(np.clip(round(float(np.median(vox[:, 2]))), 0, int(array_shape[0]) - 1))


def label_levels(
    classes: np.ndarray,
    points_px: Mapping[str, tuple[float, float]],
    pixel_mm: tuple[float, float],
) -> np.ndarray:
    """Name the bodies and discs of a class map by the nearest level point.

    Parameters
    ----------
    classes
        ``[H, W]`` class map (:data:`CLASSES` indices) of one upright sagittal image.
    points_px
        Level name (``"L4"``, ``"L4-L5"``) -> ``(row, column)`` pixel of that image.
    pixel_mm
        ``(row, column)`` pixel size in mm.

    Returns
    -------
    np.ndarray
        ``[H, W]`` int16 mask: bodies 17-26 by level, discs 100 + the vertebra above,
        canal 200; bodies and discs no point names are left out (0), and so is a piece
        holding the points of two levels, or a disc's point inside a body (two bodies run
        together where the disc between them was missed): it would measure as one body
        twice as tall.

    Raises
    ------
    ValueError
        If ``classes`` is not 2-D or ``pixel_mm`` is not two positive sizes.
    """
    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise ValueError(f"classes: expected a 2-D class map, got shape {classes.shape}")
    sy, sx = (float(v) for v in pixel_mm)
    if not (sy > 0 and sx > 0):
        raise ValueError(f"pixel_mm: two positive sizes expected, got {pixel_mm!r}")
    out = np.zeros(classes.shape, np.int16)
    out[classes == CANAL] = CANAL_LABEL
    min_px = MIN_AREA_MM2 / (sy * sx)
    for cls_, names in ((BODY, [n for n in points_px if "-" not in n]), (DISC, [n for n in points_px if "-" in n])):
        comp, n = ndimage.label(classes == cls_)
        if not n or not names:
            continue
        areas = ndimage.sum_labels(np.ones(classes.shape), comp, index=np.arange(1, n + 1))
        centres = np.asarray(ndimage.center_of_mass(np.ones(classes.shape), comp, np.arange(1, n + 1)), float)
        taken: dict[int, tuple[str, float]] = {}
        holders: dict[int, int] = {}  # component -> level points of this class in it (another class's: 2)
        for name, (r, c) in points_px.items():
            ri, ci = int(round(r)), int(round(c))
            if 0 <= ri < comp.shape[0] and 0 <= ci < comp.shape[1] and comp[ri, ci]:
                k = int(comp[ri, ci])
                holders[k] = holders.get(k, 0) + (1 if name in names else 2)
        for name in names:
            r, c = points_px[name]
            ri, ci = int(round(r)), int(round(c))
            inside = comp[ri, ci] if 0 <= ri < comp.shape[0] and 0 <= ci < comp.shape[1] else 0
            if inside and holders.get(int(inside), 0) > 1:
                # two levels in one piece (bodies run together where the disc between them was
                # missed, or a disc's point inside a body): name neither
                continue
            if inside and areas[inside - 1] >= min_px:
                k, d = int(inside), 0.0
            else:
                d_all = np.hypot((centres[:, 0] - r) * sy, (centres[:, 1] - c) * sx)
                d_all[areas < min_px] = np.inf
                k = int(np.argmin(d_all)) + 1
                d = float(d_all[k - 1])
                if d > MAX_NAMING_MM:
                    continue
            if k in taken and taken[k][1] <= d:
                continue
            taken[k] = (name, d)
        for k, (name, _) in taken.items():
            out[comp == k] = VERTEBRA_LABELS[name] if cls_ == BODY else disc_label(name)
    return out


def points_on_grid(grid: SagittalGrid, points_mm: Mapping[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Level points (patient mm) -> ``(row, column)`` on the grid's plane."""
    return {k: (float(rq[0]), float(rq[1])) for k, v in points_mm.items()
            for rq in [grid.patient_to_pixel(np.asarray(v, float))[0]]}




def upright_axes(affine: np.ndarray) -> tuple[bool, bool, bool]:
    """How to view a sagittal image upright (rows superior->inferior, columns anterior->posterior).

    Returns ``(transpose, flip_rows, flip_columns)``, applied in that order to ``image[row, column]``.
    """
    a = np.asarray(affine, float)
    col_dir = a[:3, 0] / np.linalg.norm(a[:3, 0])  # moving along a row (next column)
    row_dir = a[:3, 1] / np.linalg.norm(a[:3, 1])  # moving down a column (next row)
    transpose = abs(col_dir[2]) > abs(row_dir[2])
    if transpose:
        col_dir, row_dir = row_dir, col_dir
    return transpose, bool(row_dir[2] > 0), bool(col_dir[1] < 0)  # LPS: inferior is -z, posterior +y


def to_upright(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The image viewed upright (see :func:`upright_axes`)."""
    t, fr, fc = upright_axes(affine)
    out = image.T if t else image
    return out[::-1 if fr else 1, ::-1 if fc else 1]


def from_upright_points(points: Sequence[tuple[float, float]], shape: tuple[int, int],
                        affine: np.ndarray) -> tuple[tuple[float, float], ...]:
    """``(row, column)`` points of the upright view -> the source image's ``(row, column)``."""
    t, fr, fc = upright_axes(affine)
    h, w = (shape[1], shape[0]) if t else shape  # the upright view's shape
    out = []
    for r, c in points:
        r2, c2 = (h - 1 - r if fr else r), (w - 1 - c if fc else c)
        out.append((c2, r2) if t else (r2, c2))
    return tuple((float(r), float(c)) for r, c in out)


def pixel_spacing(affine: np.ndarray) -> tuple[float, float]:
    """``(row, column)`` pixel size in mm of a stack's images."""
    a = np.asarray(affine, float)
    return float(np.linalg.norm(a[:3, 1])), float(np.linalg.norm(a[:3, 0]))


def source_labels(seg: SagittalSegmentation, index: int, source_shape: tuple[int, int], affine: np.ndarray,
                  points_vox: Mapping[str, Sequence[float]]) -> np.ndarray:
    """Level-labelled mask of image ``index`` (into ``seg.slices``) on the source image's own pixels.

    ``points_vox`` are level points as ``(column, row, slice)`` voxels of the source stack; they
    name the bodies and discs (:func:`label_levels`).
    """
    classes = seg.to_source(index, source_shape, affine)
    pts = {k: (float(v[1]), float(v[0])) for k, v in points_vox.items()}
    t, fr, fc = upright_axes(affine)
    up = to_upright(classes, affine)
    h, w = up.shape
    pts_up = {}
    for k, (r, c) in pts.items():
        r2, c2 = (c, r) if t else (r, c)
        pts_up[k] = ((h - 1 - r2) if fr else r2, (w - 1 - c2) if fc else c2)
    sy, sx = pixel_spacing(affine)
    labels_up = label_levels(up, pts_up, (sx, sy) if t else (sy, sx))
    # back to the source orientation (flips and transposition are their own inverses)
    back = labels_up[::-1 if fr else 1, ::-1 if fc else 1]
    return np.ascontiguousarray(back.T if t else back)


def measure_image(labels: np.ndarray, affine: np.ndarray) -> Any:
    """:func:`models.measurements.measure_sagittal` of a source image's label mask, points in its own pixels."""
    import dataclasses

    from models.measurements import measure_sagittal

    t, _, _ = upright_axes(affine)
    sy, sx = pixel_spacing(affine)
    result = measure_sagittal(np.ascontiguousarray(to_upright(labels, affine)), (sx, sy) if t else (sy, sx))
    shape = labels.shape
    return dataclasses.replace(result, measurements=tuple(
        dataclasses.replace(m, points=from_upright_points(m.points, shape, affine)) for m in result.measurements))
