"""Load a :class:`~dicom_io.study.Series` into :class:`~dicom_io.volume.Volume` stacks.

Slices come from single-frame images or from the frames of enhanced multi-frame
images (per-frame and shared functional groups). They are sorted along the
slice normal, checked (same orientation, same matrix and pixel spacing, no two
at one position, evenly spaced along one line) and stacked; modality rescale is
applied and MONOCHROME1 inverted so that brighter is always higher. Compressed
pixel data are decoded by pydicom's plugins (pylibjpeg: JPEG, JPEG-LS, JPEG
2000; RLE natively).

The affine follows :class:`~dicom_io.volume.Volume`: its columns are the row
direction times the column spacing, the column direction times the row
spacing, and the step between consecutive slice positions; its translation is
the first slice's ImagePositionPatient.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_io.errors import GeometryError, PixelDataError
from dicom_io.headers import frame_geometry
from dicom_io.study import Instance, Series
from dicom_io.volume import Volume

LOGGER = logging.getLogger(__name__)

#: Largest difference between two ImageOrientationPatient values still "the same plane".
ORIENTATION_TOLERANCE = 1e-3
#: Two slices closer than this along the normal (mm) are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01


@dataclass
class _Slice:
    sop_instance_uid: str
    frame: int | None  # 1-based frame for multi-frame sources
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    thickness: float | None
    shape: tuple[int, int]
    source: _Source
    index: int  # frame index in the source's pixel array


class _Source:
    """One file: its dataset and, once decoded, its pixel frames."""

    def __init__(self, path: Path, ds: Dataset) -> None:
        self.path = path
        self.ds = ds
        self._frames: np.ndarray | None = None

    def frames(self) -> np.ndarray:
        """Pixel data as float32 ``(frames, rows, columns)``, rescaled, MONOCHROME2."""
        if self._frames is None:
            ds = self.ds
            photometric = str(ds.get("PhotometricInterpretation", "")).upper()
            if photometric not in ("MONOCHROME1", "MONOCHROME2"):
                raise PixelDataError(
                    f"{ds.SOPInstanceUID}: photometric interpretation {photometric or 'missing'} is not greyscale"
                )
            try:
                arr = ds.pixel_array
            except Exception as exc:  # decoders raise many types
                syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
                raise PixelDataError(
                    f"{ds.SOPInstanceUID}: cannot decode pixel data in transfer syntax {syntax} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3:
                raise PixelDataError(f"{ds.SOPInstanceUID}: unexpected pixel array shape {arr.shape}")
            if photometric == "MONOCHROME1":
                # Invert over the stored value range, the same for every slice of a series.
                bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
                lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.get("PixelRepresentation", 0) else (0, 2**bits - 1)
                arr = (lo + hi) - arr
            for k in range(arr.shape[0]):
                slope, intercept = _rescale(ds, k)
                if slope != 1.0 or intercept != 0.0:
                    arr[k] = arr[k] * slope + intercept
            self._frames = arr
        return self._frames


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of one frame (top level or functional groups)."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        groups = []
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and frame < len(per_frame):
            groups.append(per_frame[frame])
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            groups.append(shared[0])
        for group in groups:
            seq = group.get("PixelValueTransformationSequence")
            if seq:
                slope, intercept = seq[0].get("RescaleSlope"), seq[0].get("RescaleIntercept")
                break
    return (float(slope) if slope is not None else 1.0, float(intercept) if intercept is not None else 0.0)


def _slices_of(path: Path) -> list[_Slice]:
    """Every frame of one file with its geometry; GeometryError if any is missing."""
    try:
        ds = dcmread(path)
    except Exception as exc:  # pydicom raises many types on bad files
        raise PixelDataError(f"{Path(path).name}: not a readable DICOM file ({type(exc).__name__})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PixelDataError(f"{ds.get('SOPInstanceUID', path.name)}: no pixel data")
    source = _Source(path, ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (int(ds.Rows), int(ds.Columns))
    slices = []
    for k in range(n_frames):
        g = frame_geometry(ds, k)
        missing = [
            name
            for name, key in (
                ("ImagePositionPatient", "position"),
                ("ImageOrientationPatient", "orientation"),
                ("PixelSpacing", "spacing"),
            )
            if g[key] is None
        ]
        where = f"{ds.SOPInstanceUID}" + (f" frame {k + 1}" if n_frames > 1 else "")
        if missing:
            raise GeometryError(f"{where}: missing {', '.join(missing)}")
        orientation = np.asarray(g["orientation"], dtype=float)
        row, col = orientation[:3], orientation[3:]
        if (
            abs(np.linalg.norm(row) - 1) > 0.01
            or abs(np.linalg.norm(col) - 1) > 0.01
            or abs(float(row @ col)) > 0.01
        ):
            raise GeometryError(f"{where}: ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors")
        if min(g["spacing"]) <= 0:
            raise GeometryError(f"{where}: PixelSpacing {list(g['spacing'])} is not positive")
        slices.append(
            _Slice(
                sop_instance_uid=str(ds.SOPInstanceUID),
                frame=k + 1 if n_frames > 1 else None,
                position=np.asarray(g["position"], dtype=float),
                orientation=orientation,
                spacing=(float(g["spacing"][0]), float(g["spacing"][1])),
                thickness=g["thickness"],
                shape=shape,
                source=source,
                index=k,
            )
        )
    return slices


def _group(slices: list[_Slice]) -> list[list[_Slice]]:
    """Slices split by plane (orientation), matrix and pixel spacing."""
    groups: list[list[_Slice]] = []
    for s in slices:
        for g in groups:
            ref = g[0]
            if (
                np.max(np.abs(ref.orientation - s.orientation)) <= ORIENTATION_TOLERANCE
                and ref.shape == s.shape
                and np.allclose(ref.spacing, s.spacing, rtol=1e-3, atol=1e-4)
            ):
                g.append(s)
                break
        else:
            groups.append([s])
    return groups


def _sorted_along_normal(stack: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    o = stack[0].orientation
    normal = np.cross(o[:3], o[3:])
    d = np.array([s.position @ normal for s in stack])
    order = np.argsort(d, kind="stable")
    stack, d = [stack[i] for i in order], d[order]
    same = np.flatnonzero(np.diff(d) < DUPLICATE_TOLERANCE_MM)
    if same.size:
        a, b = stack[same[0]], stack[same[0] + 1]
        raise GeometryError(
            f"duplicate slice position {d[same[0]]:.3f} mm along the normal: "
            f"{a.sop_instance_uid}{_frame(a)} and {b.sop_instance_uid}{_frame(b)}"
        )
    return stack, d


def _frame(s: _Slice) -> str:
    return f" frame {s.frame}" if s.frame is not None else ""


def _runs(stack: list[_Slice], d: np.ndarray, split_gaps: bool) -> list[list[_Slice]]:
    """Evenly spaced runs of sorted slices: split at gaps, or raise when ``split_gaps`` is False."""
    if len(stack) < 3:
        return [stack]
    steps = np.diff(d)
    median = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - median) > max(0.1 * median, 0.05))
    if not uneven.size:
        return [stack]
    if not split_gaps:
        i = int(uneven[0])
        raise GeometryError(
            f"uneven slice spacing: {steps[i]:.3f} mm between {stack[i].sop_instance_uid}{_frame(stack[i])} "
            f"and {stack[i + 1].sop_instance_uid}{_frame(stack[i + 1])}, typical {median:.3f} mm"
        )
    runs, start = [], 0
    for i in uneven:
        runs.append(stack[start : i + 1])
        start = int(i) + 1
    runs.append(stack[start:])
    return runs


def _affine(stack: list[_Slice]) -> np.ndarray:
    first = stack[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    if len(stack) > 1:
        step = (stack[-1].position - first.position) / (len(stack) - 1)
        # Every slice must lie on the line first + k * step (catches in-plane jumps).
        expected = first.position + np.outer(np.arange(len(stack)), step)
        actual = np.array([s.position for s in stack])
        worst = float(np.max(np.linalg.norm(actual - expected, axis=1)))
        if worst > max(0.1 * float(np.linalg.norm(step)), 0.05):
            raise GeometryError(f"slice positions are not on one line (off by up to {worst:.2f} mm)")
    else:
        step = np.cross(row_dir, col_dir) * (first.thickness or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * first.spacing[1]
    affine[:3, 1] = col_dir * first.spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = first.position
    return affine


def _volume(stack: list[_Slice]) -> Volume:
    array = np.stack([s.source.frames()[s.index] for s in stack])
    ds = stack[0].source.ds
    multi = any(s.frame is not None for s in stack)
    return Volume(
        array=array,
        affine=_affine(stack),
        sop_instance_uids=[s.sop_instance_uid for s in stack],
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        frames=[s.frame or 1 for s in stack] if multi else None,
    )


def _paths(source: Series | list[Instance] | list[Any]) -> list[Path]:
    items = source.instances if isinstance(source, Series) else source
    paths = []
    for item in items:
        if isinstance(item, Instance):
            if item.rows is None and item.number_of_frames <= 1 and item.image_position is None:
                continue  # not an image (an SR or a presentation state in the series)
            paths.append(Path(item.path))
        elif isinstance(item, (str, os.PathLike)):
            paths.append(Path(item))
        else:
            raise TypeError(f"series: expected a Series or a list of Instances or paths, got {type(item).__name__}")
    return paths


def _all_slices(series: Series | list[Instance] | list[Any], min_slices: int) -> list[_Slice]:
    if min_slices < 1:
        raise ValueError(f"min_slices: must be >= 1, got {min_slices}")
    paths = _paths(series)
    if not paths:
        raise PixelDataError("no image in the series")
    return [s for p in paths for s in _slices_of(p)]


def load_volumes(series: Series | list[Instance] | list[Any], min_slices: int = 2) -> list[Volume]:
    """Every stack of a series as a Volume, largest first.

    A series may hold several stacks: planes at different angles (axial blocks
    angled per disc) or evenly spaced runs separated by gaps. Each becomes its
    own volume; stacks with fewer than ``min_slices`` slices are dropped.

    Parameters
    ----------
    series : Series or list of Instance or list of path
        The images to load.
    min_slices : int, optional
        Fewest slices a stack needs (default 2; 1 accepts single images).

    Returns
    -------
    list of Volume
        At least one.

    Raises
    ------
    GeometryError
        If an image lacks ImagePositionPatient, ImageOrientationPatient or
        PixelSpacing, two slices share a position, or no stack has
        ``min_slices`` slices.
    PixelDataError
        If pixel data are absent, not greyscale or cannot be decoded.
    ValueError
        If ``min_slices`` < 1.
    """
    slices = _all_slices(series, min_slices)
    stacks: list[list[_Slice]] = []
    for group in _group(slices):
        ordered, d = _sorted_along_normal(group)
        stacks.extend(_runs(ordered, d, split_gaps=True))
    kept = [s for s in stacks if len(s) >= min_slices]
    if not kept:
        largest = max(len(s) for s in stacks)
        raise GeometryError(f"{largest} slice{'s' if largest != 1 else ''} where a stack of at least {min_slices} is needed")
    kept.sort(key=len, reverse=True)
    return [_volume(s) for s in kept]


def load_volume(series: Series | list[Instance] | list[Any], min_slices: int = 2) -> Volume:
    """A series that must be exactly one evenly spaced stack of parallel slices.

    Parameters and errors are those of :func:`load_volumes`; in addition a
    :class:`GeometryError` is raised when slices are not parallel, not evenly
    spaced, or not on one line.
    """
    slices = _all_slices(series, min_slices)
    groups = _group(slices)
    if len(groups) > 1:
        kinds = sorted({tuple(np.round(g[0].orientation, 3)) for g in groups})
        detail = "non-parallel slices" if len(kinds) > 1 else "different matrix or pixel spacing"
        raise GeometryError(f"{detail}: {len(groups)} groups of {', '.join(str(len(g)) for g in groups)} slices")
    ordered, d = _sorted_along_normal(groups[0])
    _runs(ordered, d, split_gaps=False)
    if len(ordered) < min_slices:
        raise GeometryError(f"{len(ordered)} slice{'s' if len(ordered) != 1 else ''} where a stack of at least {min_slices} is needed")
    return _volume(ordered)


def load_projection(path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[float, float]]:
    """A projection radiograph (DX, CR) as a greyscale image and its pixel spacing.

    Radiographs have no patient-space geometry, so no Volume is built.

    Returns
    -------
    tuple of (numpy.ndarray, (float, float))
        The float32 image ``(rows, columns)``, rescaled and MONOCHROME2, and the
        (row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing,
        else (1.0, 1.0).

    Raises
    ------
    PixelDataError
        If the file has no greyscale pixel data that can be decoded.
    """
    path = Path(path)
    try:
        ds = dcmread(path)
    except Exception as exc:  # pydicom raises many types on bad files
        raise PixelDataError(f"{path.name}: not a readable DICOM file ({type(exc).__name__})") from exc
    if "PixelData" not in ds:
        raise PixelDataError(f"{ds.get('SOPInstanceUID', path.name)}: no pixel data")
    image = _Source(path, ds).frames()[0]
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)
    return image, (float(spacing[0]), float(spacing[1]))
