"""Level localizer: data, training, case-grouped cross-validation, evaluation and plots.

Data are folders in the ``lumbar-mri-levels`` format: NIfTI volumes (array axes
superior->inferior, anterior->posterior, left-right; affine to RAS mm) with a
``levels.json`` holding per-level vertebral centroids, endplate centres and disc
points. Each training sample imitates one clinical sagittal series: the 1 mm
volume is averaged into 3-5 mm slabs around a slice near the spine's mid-plane,
given a random oblique geometry (in-plane rotation, tilt, pixel size), a cut
field of view and random contrast, and goes through the very preprocessing the
localizer uses at inference (:mod:`models.localizer`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from models.localizer import (
    CHANNELS,
    DISCS,
    GRID_SHAPE,
    PIXEL_MM,
    SLAB_MM,
    VERTEBRAE,
    LevelLocalizer,
    LevelNet,
    LocalizationResult,
    SagittalGrid,
    grid_to_voxel,
    normalise,
    resample_slices,
)

#: Training crop of the canonical grid (rows, columns); the network is fully convolutional.
TRAIN_SHAPE: tuple[int, int] = (96, 80)
#: In-plane Gaussian width of the heatmap targets (grid pixels). A body centre and its
#: neighbouring disc lie about 6 pixels apart on the 3 mm grid: with 1.5 px the two
#: targets overlap below 0.01 of their height, so the maps do not merge into one ridge.
SIGMA_PX = 1.5
#: Share of training samples drawn from synthetic phantom series (the product's own demo data).
PHANTOM_FRACTION = 0.35
#: Share of training samples with no spine at all (noise, smooth fields, random blobs), all-zero
#: targets: without them the network finds a regular column of "vertebrae" in pure noise.
NEGATIVE_FRACTION = 0.1
#: Optimiser steps of every model of ``discus train levels`` (each fold's and the shipped one).
TRAIN_STEPS = 2000
#: Decay of the exponential moving average of the weights that a training run returns.
EMA_DECAY = 0.995
#: Minimum height of the lumbosacral (anchor) heatmap peak; below it no level is named. Chosen
#: on the 5-fold cross-validation of version 1.2.0 (0.3-0.5 tried; 0.4 missed the fewest studies
#: without naming a level wrong more often), so its figures are slightly optimistic.
ANCHOR_THRESHOLD = 0.4
#: A junction candidate at least this share as strong as the strongest, lower down and with a
#: column of bodies above it, is taken as L5-S1 (the lowest mobile disc); see models.localizer.
#: Off (0): on the 5-fold cross-validation of version 1.2.0 a ratio of 0.8 fixed no study and
#: shifted one (VB2-19) that was right without it.
CAUDAL_ANCHOR_RATIO = 0.0
#: Networks per package: each is trained the same way with its own seed and the localizer
#: combines their heatmaps. Single models of this recipe differ a lot by seed on held-out cases
#: (the lumbosacral anchor above all); the median of three is far steadier (see the model card).
MEMBERS = 3
#: How the localizer combines its members' heatmaps: "mean", or "median" (with 3 or more
#: members it follows the majority where one member is confidently wrong).
ENSEMBLE = "median"
#: Version written into packages trained by this module.
VERSION = "1.3.0"
#: Left-right fall-off of target heights (mm): the network learns to peak on the mid-plane.
SIGMA_LR_MM = 6.0
#: Identification radius (mm) of the metrics.
ID_RADIUS_MM = 10.0


# --------------------------------------------------------------------------- data


@dataclass
class LevelCase:
    """One labelled volume, kept as a band of sagittal planes around the spine.

    ``image`` is ``[i, j, k]`` (superior->inferior, anterior->posterior, left-right)
    in 1 mm voxels; all points are voxel ``(i, j, k)`` of ``image``; ``affine``
    maps ``(i, j, k, 1)`` of ``image`` to RAS mm.
    """

    name: str
    dataset: str
    image: np.ndarray
    affine: np.ndarray
    vertebrae: dict[str, np.ndarray]
    superior_endplates: dict[str, np.ndarray]
    axes: dict[str, np.ndarray]  # caudal unit spine axis per vertebra, voxel (i, j, k)
    discs: dict[str, np.ndarray]
    approximate_discs: frozenset[str] = frozenset()
    level_confidence: str = "high"

    @property
    def mid_k(self) -> float:
        pts = list(self.vertebrae.values()) or list(self.discs.values())
        return float(np.mean([p[2] for p in pts]))


def load_cases(data_dir: str | Path, names: Sequence[str] | None = None) -> list[LevelCase]:
    """Read the cases of a ``levels.json`` folder (all, or ``names``).

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` has no ``levels.json``.
    """
    import nibabel as nib

    data_dir = Path(data_dir)
    meta_path = data_dir / "levels.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"data_dir: no levels.json in {data_dir}")
    meta = json.loads(meta_path.read_text())
    cases = []
    for name, c in sorted(meta["cases"].items()):
        if names is not None and name not in names:
            continue
        img = nib.load(str(data_dir / c["image"]))
        verts = c.get("vertebrae") or {}
        discs = c.get("discs") or {}
        cases.append(LevelCase(
            name=name,
            dataset=str(c.get("dataset", name.split("-")[0])),
            image=np.asarray(img.dataobj),
            affine=np.asarray(c.get("affine", img.affine), dtype=float),
            vertebrae={k: np.asarray(v["centroid"]["vox"], float) for k, v in verts.items()},
            superior_endplates={k: np.asarray(v["superior_endplate"]["vox"], float)
                                for k, v in verts.items() if "superior_endplate" in v},
            axes={k: np.asarray(v["spine_axis_caudal"]["vox"], float)
                  for k, v in verts.items() if "spine_axis_caudal" in v},
            discs={k: np.asarray(v["vox"], float) for k, v in discs.items()},
            approximate_discs=frozenset(k for k, v in discs.items() if v.get("approximate")),
            level_confidence=str(c.get("level_confidence", "high")),
        ))
    return cases


def to_dicom_geometry(image: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``[i, j, k]`` volume with an RAS affine as a sagittal DICOM-style stack.

    Returns ``array[slice=k, row=i, column=j]`` and the affine from
    ``(column, row, slice, 1)`` to patient LPS mm.
    """
    a = np.asarray(affine_ras, dtype=float)
    flip = np.diag([-1.0, -1.0, 1.0])
    out = np.eye(4)
    out[:3, 0] = flip @ a[:3, 1]
    out[:3, 1] = flip @ a[:3, 0]
    out[:3, 2] = flip @ a[:3, 2]
    out[:3, 3] = flip @ a[:3, 3]
    return np.ascontiguousarray(np.transpose(image, (2, 0, 1))), out


def ras_to_lps(xyz: np.ndarray) -> np.ndarray:
    """RAS mm -> LPS mm."""
    return np.asarray(xyz, float) * np.array([-1.0, -1.0, 1.0])


def _rotation(axis: np.ndarray, deg: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def _gaussians(shape: tuple[int, int], pts: list[tuple[float, float, float]], sigma: float) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    rr, qq = np.mgrid[0:shape[0], 0:shape[1]]
    for r, q, amp in pts:
        if -3 * sigma <= r <= shape[0] + 3 * sigma and -3 * sigma <= q <= shape[1] + 3 * sigma:
            g = amp * np.exp(-((rr - r) ** 2 + (qq - q) ** 2) / (2 * sigma ** 2))
            np.maximum(out, g, out=out)
    return out


def augment_intensity(x: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast (gamma, inversion, random tone curve), bias field and noise in [0, 1]."""
    x = np.clip(x, 0, 1) ** math.exp(rng.uniform(-0.5, 0.5))
    if rng.random() < 0.2:  # T1-like: fluid dark
        x = 1.0 - x
    if rng.random() < 0.15:  # non-monotonic tone curve: other sequences and vendors
        knots = np.sort(rng.random(5))
        knots = np.concatenate([[0.0], knots, [1.0]])
        x = np.interp(x, np.linspace(0, 1, len(knots)), np.clip(knots + rng.normal(0, 0.15, len(knots)), 0, 1))
    h, w = x.shape[-2:]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    c = rng.normal(0, 0.4, 6)
    bias = np.exp(c[0] * (yy - 0.5) + c[1] * (xx - 0.5) + c[2] * (yy - 0.5) ** 2 + c[3] * (xx - 0.5) ** 2
                  + c[4] * (yy - 0.5) * (xx - 0.5))
    x = x * bias[None]
    # noise up to the level of a low-SNR water-fat or fast gradient-echo image
    x = x + rng.normal(0, rng.uniform(0, 0.06) if rng.random() < 0.7 else rng.uniform(0.06, 0.12), x.shape)
    if rng.random() < 0.3:
        x = ndimage.gaussian_filter(x, (0, rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)))
    x = normalise(np.where(valid, np.clip(x, 1e-3, None), 0.0))
    return x.astype(np.float32)


def make_sample(
    case: LevelCase, rng: np.random.Generator, shape: tuple[int, int] = TRAIN_SHAPE, augment: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training image: input ``[3, H, W]``, target ``[C, H, W]``, loss mask ``[C, H, W]``."""
    img = case.image
    ni, nj, nk = img.shape
    thick = int(rng.integers(3, 6)) if augment else 4
    step = thick + (int(rng.integers(0, 2)) if augment else 0)
    kc = int(round(case.mid_k + (rng.uniform(-1.2, 1.2) * step / 2 if augment else 0)))
    kc = int(np.clip(kc, step + thick, nk - 1 - step - thick))
    slabs = []
    for m in (-1, 0, 1):
        k0 = kc + m * step - thick // 2
        slabs.append(img[:, :, max(0, k0):max(1, k0 + thick)].astype(np.float32).mean(axis=2))
    stack = np.stack(slabs)  # [slice, row=i, column=j]

    # field-of-view cuts (rows above / below a random level are not imaged)
    cut_lo, cut_hi = -1, ni
    if augment and case.vertebrae:
        ii = sorted(p[0] for p in case.vertebrae.values())
        if rng.random() < 0.3:
            cut_lo = int(rng.uniform(0, max(1.0, ii[len(ii) // 2] - 25)))
        if rng.random() < 0.12:
            cut_hi = int(rng.uniform(ii[-2], ni))
        stack[:, : max(cut_lo, 0)] = 0
        stack[:, cut_hi:] = 0
    if augment and rng.random() < 0.5:
        s = rng.uniform(0.2, 1.2)
        stack = ndimage.gaussian_filter(stack, (0, s, s))

    # geometry: pixel size, in-plane rotation, oblique tilt, left-right sign
    sc = rng.uniform(0.85, 1.15, 2) * rng.uniform(0.95, 1.05) if augment else np.ones(2)
    lr = 1.0 if (not augment or rng.random() < 0.5) else -1.0
    m0 = np.stack([np.array([0.0, 1.0, 0.0]) * sc[0], np.array([0.0, 0.0, -1.0]) * sc[1],
                   np.array([lr * step, 0.0, 0.0])], axis=1)
    rot = np.eye(3)
    if augment:
        rot = _rotation([1, 0, 0], rng.uniform(-15, 15)) @ _rotation([0, 0, 1], rng.uniform(-10, 10)) \
            @ _rotation([0, 1, 0], rng.uniform(-10, 10))
    aff = np.eye(4)
    aff[:3, :3] = rot @ m0
    aff[:3, 3] = rng.normal(0, 20, 3) if augment else 0.0
    off = (rng.uniform(-0.2, 0.2) * nj * sc[0], rng.uniform(-0.2, 0.2) * ni * sc[1]) if augment else (0.0, 0.0)
    grid = SagittalGrid.for_stack(stack.shape, aff, offset_mm=off, grid_shape=shape)
    x = resample_slices(stack, aff, grid, [0, 1, 2])
    valid = x > 0
    x = normalise(x)
    if augment:
        x = augment_intensity(x, valid, rng)
        if rng.random() < 0.5:  # the sign of the slice axis is arbitrary
            x = x[::-1].copy()

    # targets
    col, row = grid_to_voxel(aff, grid, 1.0)  # voxel (j, i) of every grid pixel
    mask = np.ones((len(CHANNELS),) + shape, np.float32)
    band = np.zeros(shape, bool)
    if cut_lo >= 0:
        band |= np.abs(row - cut_lo) < 12
    if cut_hi < ni:
        band |= np.abs(row - cut_hi) < 12
    inside = ndimage.binary_dilation(valid[1], iterations=3)  # padding outside the image stays negative
    mask[:, band & inside] = 0.0
    top = min(case.vertebrae, key=lambda n: case.vertebrae[n][0]) if case.vertebrae else None
    if top is not None and top in case.superior_endplates and top in case.axes:
        # levels above the top labelled body are visible but unlabelled: neither positive nor negative
        ax = case.axes[top][:2] / np.linalg.norm(case.axes[top][:2])
        e = case.superior_endplates[top][:2] + 3.0 * ax
        above = (row - e[0]) * ax[0] + (col - e[1]) * ax[1] < 0
        mask[0][above & inside] = 0.0
        mask[1][above & inside] = 0.0

    def project(vox: np.ndarray) -> tuple[float, float, float] | None:
        i, j, k = vox
        if not cut_lo < i < cut_hi:
            return None
        p = aff[:3, :3] @ np.array([j, i, 1.0 + (k - kc) / step]) + aff[:3, 3]
        r, q, _ = grid.patient_to_pixel(p)[0]
        return float(r), float(q), float(math.exp(-((k - kc) ** 2) / (2 * SIGMA_LR_MM ** 2)))

    groups: list[list[tuple[float, float, float]]] = [[], [], []]
    for v in case.vertebrae.values():
        if (t := project(v)) is not None:
            groups[0].append(t)
    for name, d in case.discs.items():
        if (t := project(d)) is not None:
            groups[1].append(t)
            if name == "L5-S1":
                groups[2].append(t)
    y = np.stack([_gaussians(shape, g, SIGMA_PX) for g in groups])
    return x.astype(np.float32), y, mask


@dataclass
class PhantomSlab:
    """Five neighbouring images of a rendered phantom series on the canonical grid.

    ``images`` is ``[5, H, W]`` (``GRID_SHAPE``, normalised); ``points`` holds
    ``(channel, row, column, slice)`` grid coordinates of every target point
    (slice relative to ``images``); ``slab_mm`` is the slice spacing.
    """

    name: str
    images: np.ndarray
    points: list[tuple[int, float, float, float]]
    slab_mm: float


def render_phantom_slabs(seeds: Sequence[int], contrasts: Sequence[str] = ("T2", "T1")) -> list[PhantomSlab]:
    """Render sagittal phantom series and keep the five images around the spine's mid-plane.

    Each seed gets its own anatomy (random top level and findings) and, per contrast,
    a random slice thickness and pixel size, through the localizer's own preprocessing.
    """
    from dicom_io import phantom
    from models.localizer import reslab

    out: list[PhantomSlab] = []
    for seed in seeds:
        rng = np.random.default_rng([7919, int(seed)])
        top = str(rng.choice(["T10", "T11", "T12", "L1"]))
        anat = phantom.make_anatomy(int(seed), phantom.random_findings(rng), top=top)
        levels = phantom.ground_truth(anat)["levels"]
        for contrast in contrasts:
            ser = phantom.render_mr(anat, contrast, "sagittal", slice_thickness=float(rng.choice([3.0, 4.0, 5.0])),
                                    pixel_mm=float(rng.uniform(0.6, 1.2)))
            arr, aff, _ = reslab(ser.array, ser.affine, SLAB_MM)
            grid = SagittalGrid.for_stack(arr.shape, aff)
            names = [n for n in levels if n != "S1"]
            pix = grid.patient_to_pixel(np.array([levels[n] for n in names], float))
            mid = int(np.clip(round(float(np.median(pix[:, 2]))), 0, arr.shape[0] - 1))
            idx = [int(np.clip(mid + d, 0, arr.shape[0] - 1)) for d in (-2, -1, 0, 1, 2)]
            imgs = normalise(resample_slices(arr, aff, grid, idx))
            pts: list[tuple[int, float, float, float]] = []
            for n, (r, q, sl) in zip(names, pix):
                ch = 0 if n in VERTEBRAE else 1
                pts.append((ch, float(r), float(q), float(sl - (mid - 2))))
                if n == "L5-S1":
                    pts.append((2, float(r), float(q), float(sl - (mid - 2))))
            out.append(PhantomSlab(f"phantom-{seed}-{contrast}", imgs.astype(np.float32), pts,
                                   float(np.linalg.norm(aff[:3, 2]))))
    return out


def make_phantom_sample(slab: PhantomSlab, rng: np.random.Generator, shape: tuple[int, int] = TRAIN_SHAPE,
                        augment: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training image from a cached phantom slab: input, target and mask as :func:`make_sample`."""
    c = int(rng.integers(1, 4)) if augment else 2
    x = slab.images[[c - 1, c, c + 1]].copy()
    h, w = x.shape[-2:]
    r0 = int(rng.integers(0, h - shape[0] + 1)) if augment else (h - shape[0]) // 2
    q0 = int(rng.integers(0, w - shape[1] + 1)) if augment else (w - shape[1]) // 2
    x = x[:, r0:r0 + shape[0], q0:q0 + shape[1]]
    valid = x > 0
    if augment:
        x = augment_intensity(x, valid, rng)
        if rng.random() < 0.5:
            x = x[::-1].copy()
    groups: list[list[tuple[float, float, float]]] = [[], [], []]
    for ch, r, q, sl in slab.points:
        amp = math.exp(-(((sl - c) * slab.slab_mm) ** 2) / (2 * SIGMA_LR_MM ** 2))
        groups[ch].append((r - r0, q - q0, amp))
    y = np.stack([_gaussians(shape, g, SIGMA_PX) for g in groups])
    return np.ascontiguousarray(x, dtype=np.float32), y, np.ones_like(y)


def make_negative_sample(rng: np.random.Generator, shape: tuple[int, int] = TRAIN_SHAPE
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A three-image input without a spine (targets all zero): noise, a smooth field or random blobs."""
    h, w = shape
    kind = int(rng.integers(3))
    if kind == 0:  # noise, white or smoothed to a random grain
        x = np.abs(rng.normal(1.0, rng.uniform(0.1, 0.6), (3, h, w)))
        s = rng.uniform(0.0, 2.5)
        if s > 0.3:
            x = ndimage.gaussian_filter(x, (0, s, s))
    elif kind == 1:  # smooth low-frequency field (fat, muscle, bowel at low resolution) plus noise
        coarse = rng.random((3, 1 + int(rng.integers(2, 8)), 1 + int(rng.integers(2, 8))))
        x = np.stack([ndimage.zoom(c, (h / c.shape[0], w / c.shape[1]), order=3)[:h, :w] for c in coarse])
        x = x + rng.normal(0, 0.05, x.shape)
    else:  # random ellipses of random brightness, as organs or a non-spine field of view
        x = np.full((3, h, w), rng.uniform(0.1, 0.4))
        rr, qq = np.mgrid[0:h, 0:w]
        for _ in range(int(rng.integers(3, 15))):
            r0, q0 = rng.uniform(0, h), rng.uniform(0, w)
            a, b = rng.uniform(2, 20, 2)
            t = rng.uniform(0, math.pi)
            dr, dq = rr - r0, qq - q0
            inside = ((dr * math.cos(t) + dq * math.sin(t)) / a) ** 2 + ((-dr * math.sin(t) + dq * math.cos(t)) / b) ** 2 < 1
            x[:, inside] = rng.uniform(0, 1)
        x = x + rng.normal(0, 0.05, x.shape)
    x = normalise(np.clip(x, 1e-3, None).astype(np.float32))
    x = augment_intensity(x, x > 0, rng)
    y = np.zeros((len(CHANNELS), h, w), np.float32)
    return x.astype(np.float32), y, np.ones_like(y)


class LevelSamples(torch.utils.data.Dataset):
    """Random training samples from cases (``length`` draws per epoch).

    With ``phantoms``, a share ``phantom_fraction`` of the samples comes from them; a share
    ``negative_fraction`` of augmented samples has no spine at all (:func:`make_negative_sample`).
    """

    def __init__(self, cases: Sequence[LevelCase], length: int, seed: int = 0, augment: bool = True,
                 phantoms: Sequence[PhantomSlab] = (), phantom_fraction: float = PHANTOM_FRACTION,
                 negative_fraction: float = NEGATIVE_FRACTION) -> None:
        if not cases:
            raise ValueError("cases: need at least one case")
        if not 0.0 <= phantom_fraction <= 1.0:
            raise ValueError(f"phantom_fraction: must be in [0, 1], got {phantom_fraction!r}")
        self.cases, self.length, self.seed, self.augment = list(cases), int(length), int(seed), augment
        self.phantoms, self.phantom_fraction = list(phantoms), float(phantom_fraction)
        self.negative_fraction = float(negative_fraction)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        if self.augment and rng.random() < self.negative_fraction:
            x, y, m = make_negative_sample(rng)
        elif self.phantoms and rng.random() < self.phantom_fraction:
            slab = self.phantoms[int(rng.integers(len(self.phantoms)))]
            x, y, m = make_phantom_sample(slab, rng, augment=self.augment)
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
            x, y, m = make_sample(case, rng, augment=self.augment)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)


# --------------------------------------------------------------------------- training


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked binary cross-entropy against soft (Gaussian) targets.

    Cross-entropy is a proper score, so the optimum is the target itself: an uncertain
    network answers with low, wide maps instead of the confident blobs a positive-weighted
    squared error rewards. Positives get a mild extra weight because they are rare.
    """
    p = pred.clamp(1e-4, 1 - 1e-4)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    w = mask * (1.0 + 9.0 * target)
    w = w * torch.tensor([1.0, 1.0, 2.0], device=pred.device)[None, :, None, None]
    return (w * bce).sum() / w.sum().clamp_min(1.0)


def train_model(
    cases: Sequence[LevelCase],
    steps: int = 400,
    batch_size: int = 8,
    lr: float = 4e-3,
    seed: int = 0,
    widths: Sequence[int] = (8, 16, 24, 32, 48, 64),
    threads: int = 2,
    workers: int = 1,
    log: Any = None,
    checkpoint: Any = None,
    checkpoint_every: int = 0,
    init: LevelNet | None = None,
    phantoms: Sequence[PhantomSlab] = (),
    phantom_fraction: float = PHANTOM_FRACTION,
    ema_decay: float = EMA_DECAY,
) -> LevelNet:
    """Train a :class:`LevelNet` for ``steps`` steps (AdamW, one-cycle schedule).

    Returns the exponential moving average of the weights (``ema_decay``; 0 returns the
    last weights): single checkpoints of one run differ a lot on held-out cases, the
    average much less.

    ``checkpoint(step, net)`` is called every ``checkpoint_every`` steps (when both are set),
    so a long run leaves usable intermediate models. ``init`` continues training a network
    (fine-tuning) instead of starting from random weights.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    # Converged heatmaps are near 0 almost everywhere and their gradients underflow into
    # denormal floats, which CPUs handle many times slower: flush them to zero while training.
    # The flag is process-wide processor state, so it is set back to the default afterwards.
    torch.set_flush_denormal(True)
    try:
        return _train(cases, steps, batch_size, lr, seed, widths, workers, log, checkpoint,
                      checkpoint_every, init, phantoms, phantom_fraction, ema_decay)
    finally:
        torch.set_flush_denormal(False)


def _train(cases: Sequence[LevelCase], steps: int, batch_size: int, lr: float, seed: int,
           widths: Sequence[int], workers: int, log: Any, checkpoint: Any, checkpoint_every: int,
           init: LevelNet | None, phantoms: Sequence[PhantomSlab], phantom_fraction: float,
           ema_decay: float) -> LevelNet:
    """The training loop of :func:`train_model` (same arguments)."""
    net = init.train() if init is not None else LevelNet(widths=widths)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    ds = LevelSamples(cases, length=steps * batch_size, seed=seed, phantoms=phantoms,
                      phantom_fraction=phantom_fraction)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         persistent_workers=False)
    net.train()
    ema = copy.deepcopy(net).eval() if ema_decay else None
    t0, running = time.time(), None
    for step, (x, y, m) in enumerate(loader):
        loss = heatmap_loss(net(x), y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            _ema_update(ema, net, min(ema_decay, (1.0 + step) / (10.0 + step)))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {running:.4f} ({time.time() - t0:.0f} s)")
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            net.eval()
            checkpoint(step + 1, ema if ema is not None else net)
            net.train()
    return ema if ema is not None else net.eval()


@torch.no_grad()
def _ema_update(ema: LevelNet, net: LevelNet, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * net`` for parameters; buffers (BatchNorm statistics) copied."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


# --------------------------------------------------------------------------- evaluation


@dataclass
class CaseScore:
    """Predictions and errors of one case."""

    name: str
    errors: dict[str, float] = field(default_factory=dict)  # level -> mm (predicted and labelled)
    identified: dict[str, bool] = field(default_factory=dict)  # every labelled level
    mislabelled: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # predicted, not labelled
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    predicted: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def score_case(case: LevelCase, result: LocalizationResult, seconds: float = 0.0) -> CaseScore:
    """Compare a localization with a case's labels (patient LPS mm)."""
    affine = case.affine
    to_mm = lambda vox: ras_to_lps(affine[:3, :3] @ vox + affine[:3, 3])  # noqa: E731
    truth = {n: to_mm(v) for n, v in case.vertebrae.items()}
    truth.update({n: to_mm(v) for n, v in case.discs.items()})
    return score_points(case.name, truth, result, seconds)


def score_points(name: str, truth: dict[str, np.ndarray], result: LocalizationResult,
                 seconds: float = 0.0) -> CaseScore:
    """Compare a localization with labelled level points (patient LPS mm, keyed by level name)."""
    pred = {p.name: np.asarray(p.point_mm) for p in result.points}
    sc = CaseScore(name, reason=result.reason, warnings=list(result.warnings),
                   predicted={k: v.round(2).tolist() for k, v in pred.items()}, seconds=seconds)
    for kind in (VERTEBRAE, DISCS):
        labelled = {n: p for n, p in truth.items() if n in kind}
        for name, t in labelled.items():
            if name not in pred:
                sc.identified[name] = False
                continue
            err = float(np.linalg.norm(pred[name] - t))
            nearest = min(labelled, key=lambda n: np.linalg.norm(pred[name] - labelled[n]))
            sc.errors[name] = err
            sc.identified[name] = err <= ID_RADIUS_MM and nearest == name
        for name, p in pred.items():
            if name not in kind or not labelled:
                continue
            nearest = min(labelled, key=lambda n: np.linalg.norm(p - labelled[n]))
            if nearest != name and np.linalg.norm(p - labelled[nearest]) <= ID_RADIUS_MM:
                sc.mislabelled.append(f"{name} at {nearest}")
            if name not in labelled:
                sc.extra.append(name)
    return sc


def summarise(scores: Sequence[CaseScore], cases: Sequence[LevelCase]) -> dict[str, Any]:
    """Overall and per-level metrics from case scores."""
    approx = {c.name: c.approximate_discs for c in cases}
    vert_id, disc_id, approx_id = [], [], []
    vert_err, disc_err, approx_err = [], [], []
    per_level: dict[str, dict[str, list]] = {}
    for s in scores:
        for name, ok in s.identified.items():
            is_approx = name in approx.get(s.name, ())
            e = s.errors.get(name)
            if name in VERTEBRAE:
                vert_id.append(ok)
                if e is not None:
                    vert_err.append(e)
            elif is_approx:
                approx_id.append(ok)
                if e is not None:
                    approx_err.append(e)
            else:
                disc_id.append(ok)
                if e is not None:
                    disc_err.append(e)
            key = name + (" (approximate)" if is_approx else "")
            d = per_level.setdefault(key, {"identified": [], "errors": []})
            d["identified"].append(ok)
            if e is not None:
                d["errors"].append(e)

    def rate(v: list[bool]) -> float | None:
        return float(np.mean(v)) if v else None

    def stat(v: list[float], q: float | None = None) -> float | None:
        if not v:
            return None
        return float(np.percentile(v, q)) if q is not None else float(np.mean(v))

    return {
        "n_studies": len(scores),
        "id_rate": rate(vert_id),
        "mean_error_mm": stat(vert_err),
        "p95_error_mm": stat(vert_err, 95),
        "disc_id_rate": rate(disc_id),
        "disc_mean_error_mm": stat(disc_err),
        "disc_p95_error_mm": stat(disc_err, 95),
        "l5s1_approximate_id_rate": rate(approx_id),
        "l5s1_approximate_mean_error_mm": stat(approx_err),
        "studies_mislabelled": sum(1 for s in scores if s.mislabelled),
        "studies_with_missed_levels": sum(1 for s in scores if not all(s.identified.values())),
        "studies_without_result": sum(1 for s in scores if s.reason),
        "n_vertebrae": len(vert_id),
        "n_discs": len(disc_id),
        "mean_seconds_per_study": stat([s.seconds for s in scores]),
        "per_level": {
            k: {"n": len(v["identified"]), "id_rate": rate(v["identified"]),
                "mean_error_mm": stat(v["errors"]), "p95_error_mm": stat(v["errors"], 95)}
            for k, v in sorted(per_level.items(), key=lambda kv: _level_order(kv[0]))
        },
        "mislabelled": {s.name: s.mislabelled for s in scores if s.mislabelled},
        "missed": {s.name: sorted(n for n, ok in s.identified.items() if not ok)
                   for s in scores if not all(s.identified.values())},
        "no_result": {s.name: s.reason for s in scores if s.reason},
    }


def _level_order(key: str) -> int:
    from models.localizer import CRANIOCAUDAL

    name = key.split(" ")[0]
    return CRANIOCAUDAL.index(name) if name in CRANIOCAUDAL else 99


def localize_case(localizer: LevelLocalizer, case: LevelCase) -> tuple[LocalizationResult, float]:
    """Run the localizer on a case converted to DICOM geometry; returns result and seconds."""
    array, affine = to_dicom_geometry(case.image, case.affine)
    t0 = time.perf_counter()
    result = localizer(array, affine)
    return result, time.perf_counter() - t0


# --------------------------------------------------------------------------- plots


def plot_overlay(case: LevelCase, score: CaseScore, path: Path) -> None:
    """Mid-sagittal slice with labelled (green) and predicted (red) points and names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(round(case.mid_k))
    img = case.image[:, :, int(np.clip(k, 0, case.image.shape[2] - 1))]
    inv = np.linalg.inv(case.affine)
    fig, ax = plt.subplots(figsize=(4, 4 * img.shape[0] / max(img.shape[1], 1) * 0.8 + 0.5))
    ax.imshow(img, cmap="gray", aspect="equal")
    for name, v in {**case.vertebrae, **case.discs}.items():
        ax.plot(v[1], v[0], "+", color="lime", ms=7)
    for name, mm in score.predicted.items():
        ras = ras_to_lps(np.asarray(mm))
        v = inv[:3, :3] @ ras + inv[:3, 3]
        wrong = name in score.identified and not score.identified[name]
        ax.plot(v[1], v[0], "x", color="red" if wrong else "orange", ms=6)
        if name in VERTEBRAE:
            ax.text(v[1] - 6, v[0], name, color="red" if wrong else "yellow", fontsize=7, ha="right")
    title = case.name + (" MISLABELLED" if score.mislabelled else "") + (f"\n{score.reason[:60]}" if score.reason else "")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_errors(metrics: dict[str, Any], path: Path) -> None:
    """Bar plot of identification rate and mean error per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = metrics["per_level"]
    names = list(per)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(names)), 6), sharex=True)
    a1.bar(names, [per[n]["mean_error_mm"] or 0 for n in names], color="tab:blue", label="mean")
    a1.plot(names, [per[n]["p95_error_mm"] or 0 for n in names], "k_", ms=14, label="p95")
    a1.set_ylabel("error (mm)")
    a1.legend(fontsize=8)
    a2.bar(names, [100 * (per[n]["id_rate"] or 0) for n in names], color="tab:green")
    a2.set_ylabel("identified (%)")
    a2.set_ylim(0, 105)
    plt.setp(a2.get_xticklabels(), rotation=60, ha="right", fontsize=8)
    fig.suptitle(f"{metrics['n_studies']} studies: id {100 * (metrics['id_rate'] or 0):.1f}%, "
                 f"mean {metrics['mean_error_mm'] or float('nan'):.2f} mm", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(cases: Sequence[LevelCase], scores: Sequence[CaseScore], out_dir: Path,
                 overlays: bool = True) -> dict[str, Any]:
    """metrics.json, per-case predictions, the error plot and one overlay per case."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = summarise(scores, cases)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "cases.json").write_text(json.dumps([s.__dict__ for s in scores], indent=2))
    plot_errors(metrics, out_dir / "error_per_level.png")
    if overlays:
        (out_dir / "overlays").mkdir(exist_ok=True)
        by_name = {c.name: c for c in cases}
        for s in scores:
            plot_overlay(by_name[s.name], s, out_dir / "overlays" / f"{s.name}.png")
    return metrics


# --------------------------------------------------------------------------- packages


def save_package(net: LevelNet | Sequence[LevelNet], out_dir: str | Path, training: dict[str, Any],
                 metrics: dict[str, Any], version: str = VERSION,
                 anchor_threshold: float = ANCHOR_THRESHOLD, ensemble: str = ENSEMBLE) -> Path:
    """Write ``config.json`` + fp16 weights (+ their sha256) to ``out_dir``.

    One network gives ``model.safetensors``; an ensemble gives ``model-0.safetensors``,
    ``model-1.safetensors``, ... listed in ``weights`` with ``weights_sha256`` (see
    :func:`models.package.verify_package`).
    """
    from safetensors.torch import save_file

    from models.package import ensemble_sha256, sha256_file

    nets = list(net) if isinstance(net, (list, tuple)) else [net]
    if not nets:
        raise ValueError("net: nothing to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors"):  # a rewritten package keeps no stale member
        old.unlink()
    names = ["model.safetensors"] if len(nets) == 1 else [f"model-{i}.safetensors" for i in range(len(nets))]
    digests = []
    for name, n in zip(names, nets):
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in n.state_dict().items()}
        save_file(state, str(out / name))
        digests.append(sha256_file(out / name))
    weights: dict[str, Any] = ({"weights": names[0], "sha256": digests[0]} if len(nets) == 1 else
                               {"weights": names, "weights_sha256": digests,
                                "sha256": ensemble_sha256(digests)})
    cfg = {
        "name": "discus-levels",
        "architecture": "LevelNet",
        "task": "levels",
        "version": version,
        "input_size": list(GRID_SHAPE),
        "in_chans": 3,
        "class_names": list(CHANNELS),
        "preprocessing": {"pixel_mm": PIXEL_MM, "grid_shape": list(GRID_SHAPE), "slab_mm": SLAB_MM,
                          "normalise": "1st-99.5th percentile of non-zero pixels to 0-1",
                          "channels": "image with its two neighbouring slices"},
        "postprocessing": {"peak_threshold": 0.3, "anchor_threshold": anchor_threshold,
                           "caudal_anchor_ratio": CAUDAL_ANCHOR_RATIO, "ensemble": ensemble},
        "model_kwargs": {"widths": list(nets[0].widths)},
        "training": training,
        "metrics": metrics,
        "provenance": levels_provenance(training, metrics),
        **weights,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def levels_provenance(training: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The package's ``provenance``: the real volumes and phantoms it learned from, and how it was scored."""
    data = training.get("data", {}) if isinstance(training.get("data"), dict) else {}
    sources = [{"name": "lumbar-mri-levels (real sagittal MRI volumes, T2 TSE and water-fat gradient echo)",
                "kind": "real", "cases": int(data.get("cases", 0))}]
    phantoms = training.get("phantoms")
    if isinstance(phantoms, dict) and phantoms.get("series"):
        sources.append({"name": f"synthetic phantom sagittal series, seeds {phantoms.get('seeds', '')}",
                        "kind": "synthetic", "cases": int(phantoms["series"])})
    figures = {k: metrics[k] for k in ("id_rate", "mean_error_mm", "disc_id_rate", "studies_mislabelled")
               if k in metrics}
    return {
        "training_data": sources,
        "validation": {"method": "internal cross-validation",
                       "description": str(metrics.get("evaluation", "case-grouped cross-validation")),
                       "figures": figures},
        "domain": {"modality": "MR", "series_roles": ["SAG_T2", "SAG_STIR"], "body_part": "lumbar spine"},
    }


def merge_packages(packages: Sequence[str | Path], out_dir: str | Path, training: dict[str, Any],
                   metrics: dict[str, Any], version: str = VERSION, ensemble: str = ENSEMBLE) -> Path:
    """One ensemble package from single-model packages of the same architecture.

    Members trained in separate runs (``--members 1`` with different seeds) become the
    package ``--members N`` would have trained in one run; the post-processing of the
    first package is kept.

    Raises
    ------
    models.errors.PackageError
        If a package does not load.
    ValueError
        If the packages' architectures differ.
    """
    locs = [LevelLocalizer.from_package(p) for p in packages]
    nets = [m for loc in locs for m in loc.members]
    if len({tuple(n.widths) for n in nets}) != 1:
        raise ValueError("packages: members of one ensemble need the same widths")
    post = locs[0].config.get("postprocessing", {})
    return save_package(nets, out_dir, training, metrics, version=version,
                        anchor_threshold=float(post.get("anchor_threshold", ANCHOR_THRESHOLD)), ensemble=ensemble)


def case_folds(cases: Sequence[LevelCase], folds: int = 5, seed: int = 0) -> list[list[str]]:
    """Case-grouped folds, each dataset spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    out: list[list[str]] = [[] for _ in range(folds)]
    n = 0
    for ds in sorted({c.dataset for c in cases}):
        names = sorted(c.name for c in cases if c.dataset == ds)
        rng.shuffle(names)
        for name in names:
            out[n % folds].append(name)
            n += 1
    return out


def member_seed(seed: int, member: int, fold: int | None = None) -> int:
    """Training seed of ensemble member ``member`` (of fold ``fold``'s model; None: the shipped one)."""
    return seed + member + (fold or 0)


def cross_validate(
    data_dir: str | Path, out_dir: str | Path, folds: int = 5, steps: int = TRAIN_STEPS, seed: int = 0,
    log: Any = print, only_folds: Sequence[int] | None = None, reuse: bool = False,
    phantoms: Sequence[PhantomSlab] = (), members: int = MEMBERS,
) -> dict[str, Any]:
    """Case-grouped k-fold CV: train on k-1 folds, localize the held-out cases, report all.

    Each fold trains ``members`` networks (seeds from :func:`member_seed`) and is scored as
    the ensemble the product ships. Each fold's package is kept under ``out_dir/folds``; with
    ``reuse`` an existing one is evaluated again instead of retrained (after a
    post-processing change).
    """
    out = Path(out_dir)
    cases = load_cases(data_dir)
    splits = case_folds(cases, folds, seed)
    scores: list[CaseScore] = []
    for f, held in enumerate(splits):
        if only_folds is not None and f not in only_folds:
            continue
        train = [c for c in cases if c.name not in held]
        fold_pkg = out / "folds" / f"fold{f}"
        if reuse and (fold_pkg / "config.json").is_file():
            log(f"fold {f + 1}/{folds}: reusing the model in {fold_pkg}")
            loc = LevelLocalizer.from_package(fold_pkg)
        else:
            log(f"fold {f + 1}/{folds}: train {len(train)} cases, test {len(held)}")
            nets = []
            for m in range(members):
                if members > 1:
                    log(f"fold {f + 1}/{folds}: member {m + 1}/{members}")
                nets.append(train_model(train, steps=steps, seed=member_seed(seed, m, f), log=log,
                                        phantoms=phantoms))
            save_package(nets, fold_pkg, {"fold": f, "held_out": held, "steps": steps,
                                          "seeds": [member_seed(seed, m, f) for m in range(members)]}, {})
            loc = LevelLocalizer.from_package(fold_pkg)
        for c in cases:
            if c.name in held:
                res, sec = localize_case(loc, c)
                scores.append(score_case(c, res, sec))
        (out / "folds").mkdir(parents=True, exist_ok=True)
        (out / "folds" / f"fold{f}.json").write_text(json.dumps([s.__dict__ for s in scores], indent=2))
    metrics = write_report([c for c in cases if any(s.name == c.name for s in scores)], scores, out)
    metrics["folds"] = splits
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def train_levels(
    data_dir: str | Path, package_dir: str | Path, out_dir: str | Path | None = None, folds: int = 5,
    steps: int = TRAIN_STEPS, cv_steps: int | None = None, seed: int = 0, log: Any = print,
    phantom_seeds: int = 40, members: int = MEMBERS,
) -> Path:
    """Cross-validate (when ``folds`` > 1 and ``out_dir`` given), then train on all cases and ship.

    ``cv_steps`` (default ``steps``) trains each fold's model; fewer steps there keep the
    cross-validation affordable on a CPU and make its figures, if anything, pessimistic.
    The package's ``metrics`` are the cross-validation metrics, never the training fit.
    """
    metrics: dict[str, Any] = {}
    cv: dict[str, Any] | None = None
    log(f"rendering {phantom_seeds} phantom anatomies (T2 and T1 sagittal)")
    phantoms = render_phantom_slabs(range(phantom_seeds))
    if folds > 1 and out_dir is not None:
        cv = cross_validate(data_dir, out_dir, folds=folds, steps=cv_steps or steps, seed=seed, log=log,
                            phantoms=phantoms, members=members)
        metrics = {k: cv[k] for k in ("n_studies", "id_rate", "mean_error_mm", "p95_error_mm",
                                      "disc_id_rate", "l5s1_approximate_id_rate",
                                      "studies_mislabelled", "studies_with_missed_levels")}
        metrics["evaluation"] = (f"case-grouped {folds}-fold cross-validation, "
                                 f"{cv_steps or steps} steps per fold")
    cases = load_cases(data_dir)
    log(f"final model: {len(cases)} cases")
    nets = [train_model(cases, steps=steps, seed=member_seed(seed, m), log=log, phantoms=phantoms)
            for m in range(members)]
    training = {
        "data": {"cases": len(cases), "datasets": {d: sum(c.dataset == d for c in cases)
                                                   for d in sorted({c.dataset for c in cases})}},
        "folds": folds, "seed": seed, "members": members,
        "member_seeds": [member_seed(seed, m) for m in range(members)], "steps": steps, "cv_steps": cv_steps or steps, "batch_size": 8,
        "train_shape": list(TRAIN_SHAPE),
        "phantoms": {"seeds": f"0-{phantom_seeds - 1}", "contrasts": ["T2", "T1"], "series": len(phantoms),
                     "fraction": PHANTOM_FRACTION},
    }
    pkg = save_package(nets, package_dir, training, metrics)
    write_model_card(pkg, cv)
    (pkg / "metrics.json").write_text(json.dumps(cv if cv is not None else metrics, indent=2))
    return pkg


def evaluate_levels(data_dir: str | Path, out_dir: str | Path, package: str | Path | None = None,
                    overlays: bool = True) -> dict[str, Any]:
    """Localize every case of ``data_dir`` with a package and write metrics and plots to ``out_dir``."""
    package = Path(package) if package is not None else default_package()
    loc = LevelLocalizer.from_package(package)
    cases = load_cases(data_dir)
    scores = []
    for c in cases:
        res, sec = localize_case(loc, c)
        scores.append(score_case(c, res, sec))
    return write_report(cases, scores, Path(out_dir), overlays=overlays)


def evaluate_phantoms(seeds: Sequence[int], package: str | Path | None = None,
                      contrasts: Sequence[str] = ("T2", "T1")) -> dict[str, Any]:
    """Localize default sagittal phantom series (as the product's demo renders them) and score them.

    S1 is left out of the scores because the localizer derives it rather than detects it.
    """
    from dicom_io import phantom

    loc = LevelLocalizer.from_package(Path(package) if package is not None else default_package())
    scores: list[CaseScore] = []
    for seed in seeds:
        anat = phantom.make_anatomy(int(seed), phantom.random_findings(np.random.default_rng(int(seed))))
        truth = {k: np.asarray(v, float) for k, v in phantom.ground_truth(anat)["levels"].items() if k != "S1"}
        for contrast in contrasts:
            ser = phantom.render_mr(anat, contrast, "sagittal")
            t0 = time.time()
            res = loc(ser.array, ser.affine)
            scores.append(score_points(f"phantom-{seed}-{contrast}", truth, res, time.time() - t0))
    metrics = summarise(scores, [])
    metrics["seeds"] = [int(s) for s in seeds]
    metrics["contrasts"] = list(contrasts)
    return metrics


def default_package() -> Path:
    """The shipped levels package."""
    return Path(__file__).resolve().parents[1] / "models" / "packages" / "levels"


def _share(v: Any) -> str:
    """A training share as text: fractions as percent, descriptions as given."""
    return f"{100 * float(v):.0f}%" if isinstance(v, (int, float)) else str(v)


def write_model_card(package_dir: str | Path, cv: dict[str, Any] | None, notes: Sequence[str] = ()) -> Path:
    """``MODEL_CARD.md`` of a levels package from its config and the cross-validation report."""
    pkg = Path(package_dir)
    cfg = json.loads((pkg / "config.json").read_text())
    tr = cfg.get("training", {})

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def mm(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f} mm"

    lines = [
        f"# {cfg['name']} {cfg['version']}: vertebra and disc levels on sagittal MRI",
        "",
        "## What it does",
        "Finds the vertebral bodies T10-L5 and the discs between them on a sagittal series and names",
        "them from the sacrum: the lumbosacral (L5-S1) junction is the anchor, the first mobile body above",
        "it is L5. Without a detectable L5-S1 junction no level is reported (empty result with a reason).",
        "A second candidate junction, or an L5 much shorter than L4, lowers every confidence to <= 0.5",
        "and adds a warning (possible lumbosacral transitional vertebra) instead of shifting the names.",
        "",
        "## Method",
        f"- Each image is resampled to a {cfg['preprocessing']['pixel_mm']} mm grid of "
        f"{cfg['input_size'][0]}x{cfg['input_size'][1]} pixels in its own plane "
        "(rows inferior, columns posterior); thin-slice stacks are first averaged into "
        f"{cfg['preprocessing']['slab_mm']} mm slabs.",
        "- A small U-Net (LevelNet, widths "
        f"{cfg['model_kwargs']['widths']}) sees each image with its two neighbours and outputs three "
        "heatmaps: vertebral body centres, disc centres, and the L5-S1 disc.",
    ]
    n_members = len(cfg["weights"]) if isinstance(cfg.get("weights"), list) else 1
    if n_members > 1:
        lines += [
            f"- An ensemble of {n_members} such networks, trained the same way with seeds "
            f"{tr.get('member_seeds', '?')}; the maps are combined by their "
            f"{cfg.get('postprocessing', {}).get('ensemble', 'mean')} before any peak is picked. Single",
            "  networks of this recipe differ a lot by seed on held-out cases, above all in the L5-S1 anchor.",
        ]
    lines += [
        "- Peaks are taken on the maximum over the images within 12 mm of the spine's mid-plane; a",
        "  point's left-right position is the centroid, across images, of the map above half its",
        "  maximum there. Bodies are chained upwards from the anchor; the chain stops at the first gap,",
        "  so levels above a missed body are absent, not misnamed.",
        "- **S1 is not labelled in the training data.** Its point is derived: the L5-S1 disc point",
        "  moved caudally along the L5 axis by 0.9 times the L5-centre-to-disc distance; its confidence",
        "  is 0.6 times the anchor's, and it is reported only when it falls inside the volume.",
        "- The L5-S1 disc points used for training are themselves approximate (L5 inferior endplate",
        "  moved caudally by half the mean disc gap).",
        "",
        "## Training data",
        f"- {tr.get('data', {}).get('cases', '?')} real sagittal lumbar MRI volumes "
        f"({tr.get('data', {}).get('datasets', {})}): VB3 = MyoSegmenTUM 3 T water-fat gradient echo"
        " (L1-L5 labelled), VB2 = 1.5 T T2 TSE (T11-L5 labelled); healthy volunteers; 1 mm isotropic.",
        "- Every sample imitates a clinical series: 3-5 mm slabs near the mid-plane, in-plane rotation",
        "  +-15 deg, oblique tilt +-10 deg, pixel size +-15%, field-of-view cuts, gamma, inversion",
        "  (T1-like), random tone curves, bias field, noise, blur. Visible but unlabelled levels above",
        "  the top labelled body are excluded from the loss.",
    ]
    ph = tr.get("phantoms")
    if ph:
        lines += [
            f"- Synthetic phantoms (`dicom_io.phantom`, seeds {ph.get('seeds')}): sagittal "
            f"{'/'.join(ph.get('contrasts', []))} series with random top level, findings, slice thickness",
            f"  and pixel size, {ph.get('series')} series cached as 5 mid-plane images; "
            f"{_share(ph.get('fraction', 0))} of the training samples.",
        ]
    lines += [
        f"- {tr.get('steps')} AdamW steps of batch {tr.get('batch_size')} on "
        f"{tr.get('train_shape')} crops, seed {tr.get('seed')}, CPU.",
        "",
    ]
    if cv:
        lines += [
            "## Measured: " + str(cv.get("evaluation") or f"case-grouped {tr.get('folds')}-fold "
                                  f"cross-validation ({tr.get('cv_steps')} steps per fold)"),
            "",
            ("**Status: meets the targets** (identification >= 98%, mean error <= 3 mm, no shifted study)."
             if (cv.get("id_rate") or 0) >= 0.98 and (cv.get("mean_error_mm") or 99) <= 3.0
             and not cv.get("studies_mislabelled") else
             "**Status: does NOT meet the targets** (identification >= 98%, mean error <= 3 mm, no shifted "
             "study). Use its levels only with a person checking them; the confidences are low for that reason."),
            "",
            "| metric | value |",
            "|---|---|",
            f"| studies | {cv['n_studies']} |",
            f"| vertebra identification rate (<= 10 mm and nearest) | {pct(cv['id_rate'])} |",
            f"| vertebra error mean / p95 | {mm(cv['mean_error_mm'])} / {mm(cv['p95_error_mm'])} |",
            f"| disc identification rate (measured discs) | {pct(cv['disc_id_rate'])} |",
            f"| disc error mean / p95 | {mm(cv['disc_mean_error_mm'])} / {mm(cv['disc_p95_error_mm'])} |",
            f"| L5-S1 (approximate points) identification | {pct(cv['l5s1_approximate_id_rate'])} |",
            f"| studies with a level mislabelled | {cv['studies_mislabelled']} |",
            f"| studies with a level missed | {cv['studies_with_missed_levels']} |",
            f"| studies without result | {cv['studies_without_result']} |",
            "",
            "Per level:",
            "",
            "| level | n | identified | mean error | p95 error |",
            "|---|---|---|---|---|",
        ]
        for k, v in cv["per_level"].items():
            lines.append(f"| {k} | {v['n']} | {pct(v['id_rate'])} | {mm(v['mean_error_mm'])} | "
                         f"{mm(v['p95_error_mm'])} |")
        lines += ["", "Failure cases of this evaluation:", ""]
        for name, what in cv.get("mislabelled", {}).items():
            lines.append(f"- {name}: mislabelled {', '.join(what)}")
        for name, what in cv.get("missed", {}).items():
            lines.append(f"- {name}: missed {', '.join(what)}")
        for name, why in cv.get("no_result", {}).items():
            lines.append(f"- {name}: no result ({why})")
        lines.append("")
    if notes:
        lines += ["## Observed on the evaluation", ""] + [f"- {n}" for n in notes] + [""]
    lines += [
        "## Limits",
        "- Trained on two datasets of healthy adults; not measured on pathology (listhesis, scoliosis",
        "  beyond one case, fractures, implants), on T1/STIR, on CT reformats or on other vendors.",
        "- Transitional vertebrae are only flagged by heuristics (rival anchor, short L5); counting",
        "  from the sacrum cannot tell six lumbar vertebrae from a lumbarised S1 without a whole-spine view.",
        "- T10-T12 are named by counting upwards; no rib cue is used.",
        "- The field of view must include the L5-S1 junction; thoracolumbar-only series get no levels.",
        "- Output is AI-generated and must be checked by a radiologist.",
        "",
    ]
    path = pkg / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
