"""Vertebra and disc level localization on a sagittal series.

The localizer resamples each image of a sagittal series onto a fixed grid in the
patient's sagittal plane (rows run superior to inferior, columns anterior to
posterior, :data:`PIXEL_MM` per pixel), feeds every image with its two neighbours
as channels to a small U-Net, and reads three heatmaps from it:

- ``vertebra``: centres of mobile vertebral bodies (any level),
- ``disc``: centres of intervertebral discs (any level),
- ``lumbosacral``: the L5-S1 disc, the anchor every level is named from.

A package may hold several such networks (an ensemble); their maps are combined (mean or
median, see :meth:`LevelLocalizer._combine`) before any peak is picked.

Levels are named anatomically: the vertebra directly above the lumbosacral anchor
is L5, the next one up L4, and so on; discs lie between consecutive named bodies.
A series without a detectable lumbosacral junction gets no levels (with a reason),
rather than levels counted from the top of the field of view. S1 is not detected
as such: its point is derived from the anchor and the L5 axis (see
:func:`derive_s1`) and carries a lower confidence.

Numpy, scipy and torch only (no pydicom). The geometry helpers here are shared with
training (``training.levels``) so both see exactly the same pixels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from models.errors import PackageError
from models.package import verify_package

#: Vertebra and disc names, cranial to caudal (same as ``dicom_io.results``).
VERTEBRAE: tuple[str, ...] = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
DISCS: tuple[str, ...] = tuple(f"{a}-{b}" for a, b in zip(VERTEBRAE[:-1], VERTEBRAE[1:]))
#: All level names interleaved, cranial to caudal (T10, T10-T11, T11, ...).
CRANIOCAUDAL: tuple[str, ...] = tuple(
    n for pair in zip(VERTEBRAE, DISCS + ("",)) for n in pair if n
)
#: Heatmap channels of the network.
CHANNELS: tuple[str, ...] = ("vertebra", "disc", "lumbosacral")
#: Pixel size of the canonical sagittal grid (mm).
PIXEL_MM = 3.0
#: Canonical grid (rows superior->inferior, columns anterior->posterior).
GRID_SHAPE: tuple[int, int] = (128, 112)
#: Thin-slice stacks are averaged into slabs of about this thickness (mm), like clinical series.
SLAB_MM = 4.0
#: Most images fed to the network per series (the central ones).
MAX_CANDIDATES = 14
#: Fewest vertebral bodies above the sacrum that make a column worth naming: two peaks give a
#: single step that nothing checks (noise can do that), three give two steps that must agree.
MIN_BODIES = 3
#: Largest angle between the slice normal and the patient's left-right axis (degrees).
MAX_OBLIQUITY_DEG = 35.0
#: Largest distance from the L5-S1 junction to the body named L5, as a share of the column's
#: median body-to-body step. Anatomically it is about half a step (half a body plus half a disc);
#: a whole step means the real L5 was not detected and every name would be one level off.
MAX_FIRST_GAP_RATIO = 0.8

_LR = np.array([1.0, 0.0, 0.0])
_POSTERIOR = np.array([0.0, 1.0, 0.0])
_INFERIOR = np.array([0.0, 0.0, -1.0])


# --------------------------------------------------------------------------- results


@dataclass
class LevelPoint:
    """One named level found on the series.

    ``voxel`` is ``(column, row, slice)`` in the input array (fractional),
    ``point_mm`` the same point in patient coordinates (LPS, mm).
    """

    name: str
    voxel: tuple[float, float, float]
    point_mm: tuple[float, float, float]
    confidence: float

    def __post_init__(self) -> None:
        if self.name not in VERTEBRAE and self.name not in DISCS:
            raise ValueError(f"name: unknown level {self.name!r}")
        if not 0.0 <= float(self.confidence) <= 1.0:
            raise ValueError(f"confidence: must be in [0, 1], got {self.confidence!r}")


@dataclass
class LocalizationResult:
    """Named levels of one series; empty with ``reason`` when none could be named."""

    points: list[LevelPoint] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reason: str | None = None

    def __post_init__(self) -> None:
        if not self.points and not self.reason:
            raise ValueError("reason: required when no level was found")

    def by_name(self) -> dict[str, LevelPoint]:
        """Points keyed by level name."""
        return {p.name: p for p in self.points}


# --------------------------------------------------------------------------- geometry


class GeometryRejected(Exception):
    """Input that cannot be a sagittal spine series; the message is the reason shown."""


def check_sagittal(array: np.ndarray, affine: np.ndarray) -> None:
    """Reject what cannot be localized, with a reason a person understands.

    Raises
    ------
    GeometryRejected
        For a non-3D array, fewer than 2 slices, a non-finite or singular affine,
        non-orthogonal image axes, or images that are not sagittal.
    """
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        raise GeometryRejected(f"array must be a 3-D [slice, row, column] volume, got {np.shape(array)}")
    if array.shape[0] < 2:
        raise GeometryRejected(
            f"series has {array.shape[0]} slice(s); at least 2 sagittal slices are needed"
        )
    if min(array.shape[1:]) < 16:
        raise GeometryRejected(f"images of {array.shape[1]}x{array.shape[2]} pixels are too small")
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise GeometryRejected("geometry missing or not finite (affine must be a finite 4x4 matrix)")
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(spacing < 1e-3) or np.any(spacing > 50.0):
        raise GeometryRejected(f"implausible voxel spacing {np.round(spacing, 4).tolist()} mm")
    rdir, cdir = a[:3, 0] / spacing[0], a[:3, 1] / spacing[1]
    if abs(float(rdir @ cdir)) > 0.02:
        raise GeometryRejected("contradictory geometry: image row and column directions are not orthogonal")
    normal = np.cross(rdir, cdir)
    step = a[:3, 2] / spacing[2]
    if abs(float(normal @ step)) < 0.5:
        raise GeometryRejected("contradictory geometry: slices are not stacked along the image normal")
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(normal @ _LR))))))
    if angle > MAX_OBLIQUITY_DEG:
        plane = "axial" if abs(normal[2]) >= abs(normal[1]) else "coronal"
        raise GeometryRejected(
            f"series is not sagittal: its slice normal is {angle:.0f} degrees from left-right "
            f"(looks {plane})"
        )


def reslab(array: np.ndarray, affine: np.ndarray, slab_mm: float = SLAB_MM) -> tuple[np.ndarray, np.ndarray, int]:
    """Average thin slices into slabs of about ``slab_mm`` (clinical-like thickness).

    Returns the new array, its affine and the number of source slices per slab
    (1 when the series is already thick enough, then array and affine are unchanged).
    """
    a = np.asarray(affine, dtype=float)
    step_mm = float(np.linalg.norm(a[:3, 2]))
    n = int(round(slab_mm / step_mm))
    if n <= 1:
        return np.asarray(array, dtype=np.float32), a, 1
    m = array.shape[0] // n
    if m < 2:
        return np.asarray(array, dtype=np.float32), a, 1
    start = (array.shape[0] - m * n) // 2
    arr = np.asarray(array[start:start + m * n], dtype=np.float32)
    arr = arr.reshape(m, n, *array.shape[1:]).mean(axis=1)
    out = a.copy()
    out[:3, 2] = a[:3, 2] * n
    # slab centre = mean of its source slice centres
    out[:3, 3] = a[:3, 3] + a[:3, 2] * (start + (n - 1) / 2.0)
    return arr, out, n


@dataclass(frozen=True)
class SagittalGrid:
    """Canonical grid on the image planes of a sagittal stack.

    Pixel ``(r, q)`` of slice ``s`` lies at ``center + s * step + (q - qc) * px * u
    + (r - rc) * px * v`` where ``u`` points posterior and ``v`` inferior within the
    image plane, ``step`` is the stack's slice vector and ``rc, qc`` the grid centre.
    """

    center_mm: tuple[float, float, float]  # on the plane of slice 0
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    step: tuple[float, float, float]
    shape: tuple[int, int] = GRID_SHAPE
    pixel_mm: float = PIXEL_MM

    @classmethod
    def for_stack(
        cls,
        shape: Sequence[int],
        affine: np.ndarray,
        offset_mm: tuple[float, float] = (0.0, 0.0),
        grid_shape: tuple[int, int] = GRID_SHAPE,
        pixel_mm: float = PIXEL_MM,
    ) -> "SagittalGrid":
        """Grid centred on the stack's image centre (plus ``offset_mm`` along (u, v))."""
        a = np.asarray(affine, dtype=float)
        rdir = a[:3, 0] / np.linalg.norm(a[:3, 0])
        cdir = a[:3, 1] / np.linalg.norm(a[:3, 1])
        normal = np.cross(rdir, cdir)
        v = _INFERIOR - (_INFERIOR @ normal) * normal
        if np.linalg.norm(v) < 1e-6:
            raise GeometryRejected("image plane contains no superior-inferior direction")
        v = v / np.linalg.norm(v)
        u = np.cross(normal, v)
        if u @ _POSTERIOR < 0:
            u = -u
        rows, cols = shape[1], shape[2]
        c = a[:3, :3] @ np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0]) + a[:3, 3]
        c = c + offset_mm[0] * u + offset_mm[1] * v
        return cls(tuple(map(float, c)), tuple(map(float, u)), tuple(map(float, v)),
                   tuple(map(float, a[:3, 2])), tuple(grid_shape), float(pixel_mm))

    def pixel_to_patient(self, rows: np.ndarray, cols: np.ndarray, slices: np.ndarray) -> np.ndarray:
        """Grid coordinates -> (N, 3) patient mm."""
        rc, qc = (self.shape[0] - 1) / 2.0, (self.shape[1] - 1) / 2.0
        rows, cols, slices = (np.ravel(np.asarray(x, dtype=float)) for x in (rows, cols, slices))
        return (np.asarray(self.center_mm)[None]
                + slices[:, None] * np.asarray(self.step)[None]
                + ((cols - qc) * self.pixel_mm)[:, None] * np.asarray(self.u)[None]
                + ((rows - rc) * self.pixel_mm)[:, None] * np.asarray(self.v)[None])

    def patient_to_pixel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) patient mm -> (N, 3) grid (row, column, slice) coordinates."""
        m = np.stack([np.asarray(self.v) * self.pixel_mm, np.asarray(self.u) * self.pixel_mm,
                      np.asarray(self.step)], axis=1)
        rc, qc = (self.shape[0] - 1) / 2.0, (self.shape[1] - 1) / 2.0
        d = np.atleast_2d(np.asarray(xyz, dtype=float)) - np.asarray(self.center_mm)[None]
        rqs = np.linalg.solve(m, d.T).T
        return rqs + np.array([rc, qc, 0.0])[None]


def grid_to_voxel(affine: np.ndarray, grid: SagittalGrid, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) voxel coordinates of every grid pixel on slice ``s``, each ``grid.shape``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    rr, qq = np.mgrid[0:grid.shape[0], 0:grid.shape[1]]
    pts = grid.pixel_to_patient(rr, qq, np.full(rr.size, float(s)))
    vox = (inv[:3, :3] @ pts.T).T + inv[:3, 3]
    return vox[:, 0].reshape(grid.shape), vox[:, 1].reshape(grid.shape)


def resample_slices(
    array: np.ndarray, affine: np.ndarray, grid: SagittalGrid, slices: Sequence[int]
) -> np.ndarray:
    """Sample the given slices of ``array`` onto ``grid``: float32 ``[len(slices), H, W]``.

    Pixels outside the image are 0. Images finer than the grid are low-pass
    filtered first so that downsampling does not alias.
    """
    a = np.asarray(affine, dtype=float)
    h, w = grid.shape
    sp = np.linalg.norm(a[:3, :2], axis=0)  # (column spacing, row spacing)
    sigma = [max(0.0, 0.45 * (grid.pixel_mm / sp[1] - 1.0)), max(0.0, 0.45 * (grid.pixel_mm / sp[0] - 1.0))]
    out = np.zeros((len(slices), h, w), dtype=np.float32)
    for n, s in enumerate(slices):
        col, row = grid_to_voxel(a, grid, float(s))
        img = np.asarray(array[int(s)], dtype=np.float32)
        if sigma[0] > 0.05 or sigma[1] > 0.05:
            img = ndimage.gaussian_filter(img, sigma)
        out[n] = ndimage.map_coordinates(img, np.stack([row, col]), order=1, cval=0.0, prefilter=False)
        outside = (col < -0.5) | (col > img.shape[1] - 0.5) | (row < -0.5) | (row > img.shape[0] - 0.5)
        out[n][outside] = 0.0
    return out


def normalise(images: np.ndarray) -> np.ndarray:
    """Scale intensities so the 1st..99.5th percentile of non-zero pixels maps to 0..1."""
    x = np.asarray(images, dtype=np.float32)
    fg = x[x > 0]
    if fg.size < 100:
        return np.zeros_like(x)
    lo, hi = np.percentile(fg, [1.0, 99.5])
    if hi - lo < 1e-6:
        return np.zeros_like(x)
    y = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    y[x == 0] = 0.0
    return y.astype(np.float32)


def neighbour_inputs(images: np.ndarray, centres: Sequence[int]) -> np.ndarray:
    """``[len(centres), 3, H, W]``: each centre image between its two neighbours (edges repeat)."""
    n = images.shape[0]
    idx = [[max(0, c - 1), c, min(n - 1, c + 1)] for c in centres]
    return np.stack([images[i] for i in idx]).astype(np.float32)


# --------------------------------------------------------------------------- network


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class LevelNet(nn.Module):
    """Small U-Net: ``[N, in_chans, H, W]`` -> heatmaps ``[N, len(CHANNELS), H, W]`` in [0, 1].

    With ``output="logits"`` it returns raw scores instead (the spine segmenter's classes,
    :mod:`models.segmentation`).

    Inputs are padded internally to a multiple of ``2 ** (len(widths) - 1)``. The deep end
    sees about 200 mm, enough to tell the sacrum from a lumbar body.
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (8, 16, 24, 32, 48, 64),
                 out_chans: int = len(CHANNELS), output: str = "sigmoid") -> None:
        super().__init__()
        if output not in ("sigmoid", "logits"):
            raise ValueError(f"output: 'sigmoid' (heatmaps) or 'logits' (segmentation), got {output!r}")
        #: ``sigmoid``: independent heatmaps in [0, 1]; ``logits``: raw class scores (softmax by the caller).
        self.output = output
        if in_chans < 1:
            raise ValueError(f"in_chans: must be >= 1, got {in_chans}")
        if len(widths) < 2:
            raise ValueError(f"widths: need at least 2 stages, got {widths!r}")
        self.widths = tuple(int(w) for w in widths)
        self.down = nn.ModuleList()
        cin = in_chans
        for w in self.widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w_hi, w_lo in zip(self.widths[-2::-1], self.widths[:0:-1]):
            self.up.append(nn.ConvTranspose2d(w_lo, w_hi, 2, stride=2))
            self.fuse.append(_block(2 * w_hi, w_hi))
        self.head = nn.Conv2d(self.widths[0], out_chans, 1)

    def fused(self) -> "LevelNet":
        """An inference copy with every BatchNorm folded into the convolution before it.

        Same outputs (to float rounding) in eval mode, without the separate normalisation pass;
        the copy is for inference only (its BatchNorm layers are gone).
        """
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        net = copy.deepcopy(self).eval()
        for m in net.modules():
            if isinstance(m, nn.Sequential):
                for i in range(len(m) - 1):
                    if isinstance(m[i], nn.Conv2d) and isinstance(m[i + 1], nn.BatchNorm2d):
                        m[i] = fuse_conv_bn_eval(m[i], m[i + 1])
                        m[i + 1] = nn.Identity()
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k = 2 ** (len(self.widths) - 1)
        ph, pw = (-h) % k, (-w) % k
        if ph or pw:  # any image size: pad to the pooling multiple, crop back below
            x = nn.functional.pad(x, (0, pw, 0, ph))
        skips = []
        for i, blk in enumerate(self.down):
            if i:
                x = nn.functional.max_pool2d(x, 2)
            x = blk(x)
            skips.append(x)
        x = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
        y = self.head(x)[..., :h, :w]
        return torch.sigmoid(y) if self.output == "sigmoid" else y


# --------------------------------------------------------------------------- labelling


@dataclass(frozen=True)
class Peak:
    """A heatmap maximum on the canonical grid: position (mm in the grid plane) and height."""

    row: float
    col: float
    value: float

    def xy(self, pixel_mm: float = PIXEL_MM) -> np.ndarray:
        return np.array([self.row, self.col]) * pixel_mm


def find_peaks(heat: np.ndarray, threshold: float, min_distance_px: int) -> list[Peak]:
    """Local maxima of a 2-D map above ``threshold``, refined to sub-pixel by a weighted centroid."""
    size = 2 * int(min_distance_px) + 1
    mx = ndimage.maximum_filter(heat, size=size, mode="constant")
    rr, qq = np.nonzero((heat == mx) & (heat >= threshold))
    peaks = []
    for r, q in zip(rr, qq):
        r0, r1, q0, q1 = max(0, r - 2), min(heat.shape[0], r + 3), max(0, q - 2), min(heat.shape[1], q + 3)
        win = np.clip(heat[r0:r1, q0:q1] - 0.5 * heat[r, q], 0.0, None)
        gr, gq = np.mgrid[r0:r1, q0:q1]
        wsum = float(win.sum())
        pr, pq = ((float((win * gr).sum() / wsum), float((win * gq).sum() / wsum)) if wsum > 0
                  else (float(r), float(q)))
        peaks.append(Peak(pr, pq, float(heat[r, q])))
    return sorted(peaks, key=lambda p: -p.value)


@dataclass(frozen=True)
class Chain:
    """Vertebrae named from the sacrum: ``names[i]`` is the level of ``peaks[i]`` (L5 first)."""

    anchor: Peak
    peaks: tuple[Peak, ...]
    names: tuple[str, ...]


def chain_from_sacrum(
    anchor: Peak,
    vertebrae: Sequence[Peak],
    pixel_mm: float = PIXEL_MM,
    first_gap_mm: tuple[float, float] = (8.0, 40.0),
    step_mm: tuple[float, float] = (18.0, 60.0),
    max_turn_deg: float = 45.0,
) -> Chain:
    """Walk up the spine from the lumbosacral anchor and name each body.

    The body nearest above the anchor (within ``first_gap_mm``) is L5; each next
    body is the nearest one ``step_mm`` away whose direction turns by at most
    ``max_turn_deg`` from the previous step. Walking stops at the first gap, so
    levels beyond a missed body are left out rather than misnamed. Rows grow
    caudally, so "above" means a smaller row.
    """
    names = VERTEBRAE[-2::-1]  # L5, L4, ... T10
    a = anchor.xy(pixel_mm)
    pool = list(vertebrae)
    chain: list[Peak] = []
    cur, direction = a, np.array([-1.0, 0.0])
    lo, hi = first_gap_mm
    while len(chain) < len(names):
        best, best_d = None, np.inf
        for p in pool:
            d = p.xy(pixel_mm) - cur
            dist = float(np.linalg.norm(d))
            if not lo <= dist <= hi or d[0] >= 0:
                continue
            cosang = float(d @ direction) / dist
            if cosang < np.cos(np.radians(max_turn_deg if chain else 60.0)):
                continue
            if dist < best_d:
                best, best_d = p, dist
        if best is None:
            break
        nxt = best.xy(pixel_mm)
        direction = (nxt - cur) / np.linalg.norm(nxt - cur)
        cur = nxt
        chain.append(best)
        pool.remove(best)
        lo, hi = step_mm
    return Chain(anchor, tuple(chain), tuple(names[: len(chain)]))


def regular_prefix(chain: Chain, pixel_mm: float = PIXEL_MM, low: float = 0.6, high: float = 1.6,
                   min_step_mm: float = 22.0) -> Chain:
    """Keep the chain from the sacrum up to the first irregular step.

    A step shorter than ``low`` or longer than ``high`` times the median step, or
    shorter than ``min_step_mm`` (less than an adult vertebral height plus disc), is
    not the next vertebra of a normal column (a stray peak, a missed body); the
    levels beyond it are dropped rather than named on doubtful ground.
    """
    pts = [chain.anchor.xy(pixel_mm)] + [p.xy(pixel_mm) for p in chain.peaks]
    steps = [float(np.linalg.norm(b - a)) for a, b in zip(pts[1:-1], pts[2:])]  # body to body
    if not steps:
        return chain
    med = float(np.median(steps))
    keep = len(chain.peaks)
    for i, st in enumerate(steps):
        if not low * med <= st <= high * med or st < min_step_mm:
            keep = i + 1
            break
    return Chain(chain.anchor, chain.peaks[:keep], chain.names[:keep])


def derive_s1(anchor_mm: np.ndarray, l5_mm: np.ndarray, factor: float = 0.9) -> np.ndarray:
    """S1 body centre estimated from the L5-S1 disc point and the L5 centre.

    S1 is not labelled in the training data: its centre is taken ``factor`` times the
    L5-centre-to-disc distance caudally beyond the disc, along the L5 axis.
    """
    d = np.asarray(anchor_mm, float) - np.asarray(l5_mm, float)
    return np.asarray(anchor_mm, float) + factor * d


# --------------------------------------------------------------------------- localizer


@dataclass
class _Maps:
    heat: np.ndarray  # [n_candidates, C, H, W]
    candidates: list[int]
    step: np.ndarray | None = None  # slice vector of the working stack (mm)


class LevelLocalizer:
    """Vertebra and disc levels on a sagittal series.

    Parameters
    ----------
    net : LevelNet
        Trained network (put in eval mode here).
    config : dict
        The package's ``config.json`` content; ``preprocessing`` and ``postprocessing``
        keys override the module defaults.
    """

    def __init__(self, net: LevelNet | Sequence[LevelNet], config: dict[str, Any] | None = None) -> None:
        nets = list(net) if isinstance(net, (list, tuple)) else [net]
        if not nets:
            raise ValueError("net: an ensemble needs at least one network")
        for n in nets:
            if not isinstance(n, nn.Module):
                raise TypeError(f"net: expected a torch module, got {type(n).__name__}")
        #: Every network of the ensemble (one for a single-model package); ``net`` is the first.
        self.members = [n.eval() for n in nets]
        self.net = self.members[0]
        # what inference runs: BatchNorm folded into the convolutions; the members stay as given
        self._fast = [n.fused() if isinstance(n, LevelNet) else n for n in self.members]
        self.config = dict(config or {})
        post = self.config.get("postprocessing", {})
        self.threshold = float(post.get("peak_threshold", 0.3))
        self.anchor_threshold = float(post.get("anchor_threshold", 0.3))
        self.caudal_anchor_ratio = float(post.get("caudal_anchor_ratio", 0.0))
        self.ensemble = str(post.get("ensemble", "mean"))
        if self.ensemble not in ("mean", "median"):
            raise ValueError(f"postprocessing.ensemble: 'mean' or 'median', got {self.ensemble!r}")
        pre = self.config.get("preprocessing", {})
        self.pixel_mm = float(pre.get("pixel_mm", PIXEL_MM))
        self.grid_shape = tuple(pre.get("grid_shape", GRID_SHAPE))
        self.slab_mm = float(pre.get("slab_mm", SLAB_MM))

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_package(cls, path: str | Path) -> "LevelLocalizer":
        """Load a model package directory (``config.json`` + weights).

        Raises
        ------
        PackageError
            If files are missing, the task is not ``levels``, or the weights'
            sha256 differs from the one in the config.
        """
        from safetensors.torch import load_file

        path = Path(path)
        config = verify_package(path)
        if config.task != "levels":
            raise PackageError(f"path: package task is {config.task!r}, expected 'levels'")
        cfg = config.to_dict()
        names = config.weight_files
        kwargs = dict(cfg.get("model_kwargs", {}))
        nets = []
        for name in names:
            net = LevelNet(in_chans=int(cfg.get("in_chans", 3)), **kwargs)
            state = {k: t.float() for k, t in load_file(str(path / name)).items()}
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise PackageError(f"path: weights {name} do not fit the architecture: {exc}") from exc
            nets.append(net)
        return cls(nets, cfg)

    # ----------------------------------------------------------------- inference
    def heatmaps(self, array: np.ndarray, affine: np.ndarray) -> tuple[_Maps, SagittalGrid, np.ndarray, np.ndarray]:
        """Network heatmaps on the central images of a (re-slabbed) stack.

        Returns the maps, the grid, and the working stack's array and affine.
        """
        arr, aff, _ = reslab(array, affine, self.slab_mm)
        grid = SagittalGrid.for_stack(arr.shape, aff, grid_shape=self.grid_shape, pixel_mm=self.pixel_mm)
        n = arr.shape[0]
        if n > MAX_CANDIDATES:
            start = (n - MAX_CANDIDATES) // 2
            candidates = list(range(start, start + MAX_CANDIDATES))
        else:
            candidates = list(range(n))
        needed = sorted({j for c in candidates for j in (c - 1, c, c + 1) if 0 <= j < n})
        imgs = np.zeros((n,) + tuple(self.grid_shape), dtype=np.float32)
        imgs[needed] = resample_slices(arr, aff, grid, needed)
        imgs[needed] = normalise(imgs[needed])
        x = torch.from_numpy(neighbour_inputs(imgs, candidates))
        with torch.inference_mode():
            heat = self._combine(torch.stack([net(x).float() for net in self._fast])).numpy()
        return _Maps(heat, candidates, np.asarray(aff[:3, 2], float)), grid, arr, aff

    def _combine(self, maps: torch.Tensor) -> torch.Tensor:
        """One set of maps from the members' ``[members, ...]``: their mean, or their median.

        The median (``postprocessing.ensemble = "median"``) follows the majority where one member
        of three or more is confidently wrong; with two members both rules are the mean.
        """
        if len(maps) > 2 and self.ensemble == "median":
            return maps.median(dim=0).values
        return maps.mean(dim=0)

    def __call__(self, array: np.ndarray, affine: np.ndarray) -> LocalizationResult:
        """Find and name the levels of a sagittal series.

        Parameters
        ----------
        array : np.ndarray
            ``[slice, row, column]`` voxels of a sagittal series.
        affine : np.ndarray
            4x4, ``affine @ [column, row, slice, 1]`` = patient LPS mm.

        Returns
        -------
        LocalizationResult
            Points cranial to caudal; empty with a reason when the input is not a
            sagittal spine series or the sacrum cannot be found.
        """
        try:
            check_sagittal(array, affine)
            if not np.any(np.isfinite(array)) or float(np.nanmax(array)) <= float(np.nanmin(array)):
                raise GeometryRejected("images are blank (constant intensity)")
            array = np.nan_to_num(np.asarray(array, dtype=np.float32))
            maps, grid, arr, aff = self.heatmaps(array, affine)
        except GeometryRejected as exc:
            return LocalizationResult(reason=str(exc))
        return self._name_levels(maps, grid, np.asarray(affine, float), array.shape)

    def _name_levels(self, maps: _Maps, grid: SagittalGrid, affine: np.ndarray,
                     shape: tuple[int, ...]) -> LocalizationResult:
        px = self.pixel_mm
        proj = self._midplane_projection(maps)  # [C, H, W]
        vert = find_peaks(proj[0], self.threshold, min_distance_px=int(12 / px))
        discs = find_peaks(proj[1], self.threshold, min_distance_px=int(8 / px))
        anchors = find_peaks(proj[2], self.anchor_threshold, min_distance_px=int(20 / px))
        # a body peak where the disc map is stronger is a disc, and the other way round
        at = lambda ch, p: proj[ch][int(round(p.row)), int(round(p.col))]  # noqa: E731
        vert = [p for p in vert if at(0, p) >= at(1, p)]
        discs = [p for p in discs if at(1, p) >= at(0, p)]
        warnings: list[str] = []
        if not anchors:
            why = ("no lumbosacral junction (L5-S1) found in the field of view: levels are named from "
                   "the sacrum, so none are reported")
            if not vert:
                why = "no vertebral bodies found: the series does not look like a sagittal spine image"
            return LocalizationResult(reason=why)
        anchor = anchors[0]
        chain = chain_from_sacrum(anchor, vert, px)
        trust = min(1.0, anchor.value)
        if len(chain.peaks) < MIN_BODIES:
            # the strongest junction candidate has no spine above it: try the others, but say so
            for alt in anchors[1:]:
                alt_chain = chain_from_sacrum(alt, vert, px)
                if len(alt_chain.peaks) >= MIN_BODIES:
                    anchor, chain = alt, alt_chain
                    trust = min(0.4, alt.value)
                    warnings.append("the strongest L5-S1 candidate had no vertebrae above it; "
                                    "a weaker one was used and level names are uncertain")
                    break
        chain = regular_prefix(chain, px)
        if self.caudal_anchor_ratio > 0:
            # The lumbosacral junction is the lowest mobile disc: a junction candidate nearly as
            # strong as the chosen one, lower down and with its own column of bodies above it, is it.
            lower = [a for a in anchors if a.row > anchor.row + 15.0 / px
                     and a.value >= self.caudal_anchor_ratio * anchor.value]
            for alt in sorted(lower, key=lambda a: -a.row):
                alt_chain = regular_prefix(chain_from_sacrum(alt, vert, px), px)
                if len(alt_chain.peaks) >= MIN_BODIES:
                    anchor, chain = alt, alt_chain
                    trust = min(trust, alt.value)
                    break
        if len(chain.peaks) < MIN_BODIES:
            return LocalizationResult(
                reason=f"only {len(chain.peaks)} vertebral body(ies) found above the sacrum in a regular column; "
                       "too few to name levels"
            )
        pts_mm = [anchor.xy(px)] + [c.xy(px) for c in chain.peaks]
        step = float(np.median([np.linalg.norm(b - a) for a, b in zip(pts_mm[1:], pts_mm[2:])]))
        if np.linalg.norm(pts_mm[1] - pts_mm[0]) > MAX_FIRST_GAP_RATIO * step:
            return LocalizationResult(
                reason="the lowest vertebral body found lies a whole level above the L5-S1 junction (L5 was "
                       "probably not detected): levels are not named, they would be one level off"
            )
        rivals = [a for a in anchors if a is not anchor and a.value >= 0.5 * anchor.value
                  and np.linalg.norm(a.xy(px) - anchor.xy(px)) > 15.0]
        if rivals:
            trust = min(trust, 0.4)
            warnings.append(
                "possible lumbosacral transitional vertebra: more than one candidate L5-S1 junction; "
                "level names are uncertain"
            )
        pts = [c.xy(px) for c in chain.peaks]
        if len(pts) >= 3:
            s_l5 = np.linalg.norm(pts[0] - pts[1])
            s_l4 = np.linalg.norm(pts[1] - pts[2])
            if s_l5 < 0.7 * s_l4 or np.linalg.norm(pts[0] - anchor.xy(px)) < 0.3 * s_l4:
                trust = min(trust, 0.5)
                warnings.append(
                    "L5 is unusually short or close to the sacrum (possible transitional vertebra); "
                    "level names are uncertain"
                )
        left = [p for p in vert if p not in chain.peaks and p.row < min(c.row for c in chain.peaks)
                and p.value > 0.6]
        if left and len(chain.peaks) < len(VERTEBRAE) - 1:
            warnings.append(f"vertebral chain broken above {chain.names[-1]}; higher levels not reported")

        found: list[tuple[str, float, float, int, float]] = []  # name, row, col, channel, conf
        for p, name in zip(chain.peaks, chain.names):
            found.append((name, p.row, p.col, 0, min(1.0, p.value) * trust))
        # discs between consecutive bodies: the disc peak near their midpoint, else the midpoint
        seq = [anchor] + list(chain.peaks)
        seq_names = ["S1"] + list(chain.names)
        found.append(("L5-S1", anchor.row, anchor.col, 2, trust))
        for lower, upper, lo_name, up_name in zip(seq[1:-1], seq[2:], seq_names[1:-1], seq_names[2:]):
            mid = (lower.xy(px) + upper.xy(px)) / 2.0
            radius = 0.3 * float(np.linalg.norm(lower.xy(px) - upper.xy(px)))
            near = [d for d in discs if np.linalg.norm(d.xy(px) - mid) <= radius]
            name = f"{up_name}-{lo_name}"
            if near:
                d = max(near, key=lambda d: d.value)
                found.append((name, d.row, d.col, 1, min(1.0, d.value) * trust))
            else:
                found.append((name, mid[0] / px, mid[1] / px, -1, 0.5 * trust))
        points: list[LevelPoint] = []
        inv = np.linalg.inv(affine)
        for name, r, q, ch, conf in found:
            s = self._slice_of(maps, r, q, ch)
            xyz = grid.pixel_to_patient([r], [q], [s])[0]
            points.append(self._point(name, xyz, inv, conf))
        named = {p.name: p for p in points}
        s1 = derive_s1(np.asarray(named["L5-S1"].point_mm), np.asarray(named["L5"].point_mm))
        vox = (inv[:3, :3] @ s1) + inv[:3, 3]
        inside = all(-0.5 <= vox[i] <= shape[2 - i] - 0.5 for i in range(3))
        if inside:  # S1 reported only when its derived centre lies in the field of view
            points.append(self._point("S1", s1, inv, 0.6 * trust))
        points.sort(key=lambda p: CRANIOCAUDAL.index(p.name))
        return LocalizationResult(points=points, warnings=warnings)

    def _midplane_projection(self, maps: _Maps, half_width_mm: float = 12.0) -> np.ndarray:
        """Maximum of the maps over the images within ``half_width_mm`` of the spine's mid-plane.

        The mid-plane is the image with the most vertebra and disc response (smoothed over
        neighbours); images far lateral of it (psoas, ribs, facets) only add stray peaks.
        """
        heat = maps.heat
        mass = np.clip(heat[:, :2] - 0.3, 0.0, None).sum(axis=(1, 2, 3))
        if len(mass) >= 3:
            mass = np.convolve(mass, [0.25, 0.5, 0.25], mode="same")
        c = int(np.argmax(mass))
        step = float(np.linalg.norm(maps.step)) if maps.step is not None else SLAB_MM
        k = max(1, int(round(half_width_mm / max(step, 1e-3))))
        return heat[max(0, c - k):c + k + 1].max(axis=0)

    @staticmethod
    def _point(name: str, xyz: np.ndarray, inv: np.ndarray, conf: float) -> LevelPoint:
        vox = (inv[:3, :3] @ xyz) + inv[:3, 3]
        return LevelPoint(name, tuple(float(v) for v in vox), tuple(float(v) for v in xyz),
                          float(np.clip(conf, 0.0, 1.0)))

    def _slice_of(self, maps: _Maps, row: float, col: float, channel: int) -> float:
        """Working-stack slice position of a point: centroid of the heatmap's upper half across images.

        A vertebral body is several images wide and the maps answer on all of them with
        nearly the same height, so the arg-maximum jumps from side to side; the centroid of
        the part above half the maximum is the body's (or disc's) middle.
        """
        r = int(np.clip(round(row), 0, maps.heat.shape[2] - 1))
        q = int(np.clip(round(col), 0, maps.heat.shape[3] - 1))
        if channel < 0:
            prof = maps.heat[:, 0, r, q] + maps.heat[:, 1, r, q]
        else:
            prof = maps.heat[:, channel, r, q]
        w = np.clip(prof - 0.5 * float(prof.max()), 0.0, None)
        if float(w.sum()) <= 0.0:
            return float(maps.candidates[int(np.argmax(prof))])
        return float(np.dot(w, np.asarray(maps.candidates, float)) / float(w.sum()))
