"""Sagittal spine segmentation from real masks: data, partial-label loss, cross-validation, package.

Two real data sets mask different structures:

- ``spider-space`` (SPIDER T2 SPACE, up to 11 central sagittal slices per patient): vertebrae
  (bodies and posterior elements as separate regions), discs and the spinal canal. Bodies are the
  vertebra regions in front of the canal; levels are counted up from the lowest disc (L5-S1). The
  sacrum is never masked, so below the L5-S1 disc a pixel that is neither canal nor disc may be
  background or bone.
- ``lumbar-mri-levels`` (1 mm volumes, T2 TSE and water-fat gradient echo): vertebral bodies by
  level only. Between the top and the lowest labelled body a pixel outside the bodies is
  background, disc or canal; elsewhere it may be anything.

Each pixel therefore carries the *set* of classes it may belong to (a bit mask), and the loss is
the negative log of the probability the network gives that set (:func:`partial_label_loss`): a
fully labelled pixel is ordinary cross-entropy, a pixel known only to be "not a body" pushes
probability away from the body class and nowhere else. A soft Dice term on the fully labelled
pixels helps the thin structures.

Training samples are random patches of :data:`PATCH` pixels on the upright 1 mm grid, scaled,
rotated and contrast-augmented; inference (:mod:`models.segmentation`) runs the same network on
whole images resampled the same way.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from models.localizer import LevelNet, normalise
from models.measurements import CANAL_LABEL, VERTEBRA_LABELS, disc_label
from models.segmentation import BODY, CANAL, CLASSES, DISC, MIN_AREA_MM2, PIXEL_MM, TASK, SpineSegmenter
from training.levels import augment_intensity, case_folds

#: Training patch (rows, columns) on the 1 mm grid.
PATCH: tuple[int, int] = (128, 128)
#: Network widths (encoder stages).
WIDTHS: tuple[int, ...] = (12, 24, 32, 48, 64)
#: Default optimiser steps and batch size.
STEPS = 2500
CV_STEPS = 1500
BATCH = 6
#: Weight of the soft Dice term: it keeps the small classes (canal, discs) from being given up
#: early (at 0.5 and 400 steps, one fold of three never predicted the canal).
DICE_WEIGHT = 1.0
#: Share of each batch drawn from the fully labelled set.
SPIDER_SHARE = 0.7
#: Package version written by :func:`save_package`.
VERSION = "1.0.0"
ALL = (1 << len(CLASSES)) - 1
_DISC_NAMES = ("L5-S1", "L4-L5", "L3-L4", "L2-L3", "L1-L2", "T12-L1", "T11-T12", "T10-T11", "T9-T10")


@dataclass
class SegSlice:
    """One labelled sagittal image (upright: row 0 superior, column 0 anterior).

    ``classes`` holds the reference class per pixel where it is known exactly, ``allowed`` the
    bit mask of the classes a pixel may belong to (bit ``c`` for class ``c``), ``levels`` the
    reference mask in the level label scheme and ``points`` the centre of each named body and disc.
    """

    image: np.ndarray
    classes: np.ndarray
    allowed: np.ndarray
    levels: np.ndarray
    points: dict[str, tuple[float, float]]
    spacing: tuple[float, float]


@dataclass
class SegCase:
    """One patient or volume: its labelled slices, consecutive, with their slice spacing (mm)."""

    name: str
    dataset: str
    slices: list[SegSlice]
    slice_mm: float
    structures: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mid(self) -> int:
        """Index of the central slice: the one with the largest body area."""
        return int(np.argmax([(s.classes == BODY).sum() for s in self.slices]))

    @property
    def affine(self) -> np.ndarray:
        """Affine of the slices as a sagittal stack, ``(column, row, slice)`` to patient (LPS) mm."""
        sy, sx = self.slices[0].spacing
        aff = np.eye(4)
        aff[:3, 0] = (0.0, sx, 0.0)  # columns run posterior
        aff[:3, 1] = (0.0, 0.0, -sy)  # rows run inferior
        aff[:3, 2] = (self.slice_mm, 0.0, 0.0)
        return aff

    def stack(self) -> tuple[np.ndarray, np.ndarray]:
        """The slices as a sagittal stack ``[slice, row, column]`` and its :attr:`affine`."""
        return np.stack([s.image for s in self.slices]).astype(np.float32), self.affine


# --------------------------------------------------------------------------- data


def _components(mask: np.ndarray, min_px: float) -> list[np.ndarray]:
    lab, n = ndimage.label(mask)
    if not n:
        return []
    sizes = ndimage.sum_labels(np.ones(mask.shape), lab, np.arange(1, n + 1))
    return [lab == k + 1 for k in range(n) if sizes[k] >= min_px]


def spider_slice(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float]) -> SegSlice:
    """A ``spider-space`` image and mask (0, 1 vertebra, 2 disc, 3 canal) as a :class:`SegSlice`."""
    min_px = MIN_AREA_MM2 / (spacing[0] * spacing[1])
    canal = mask == 3
    classes = np.zeros(mask.shape, np.uint8)
    levels = np.zeros(mask.shape, np.int16)
    points: dict[str, tuple[float, float]] = {}
    classes[canal] = CANAL
    levels[canal] = CANAL_LABEL
    discs = sorted(_components(mask == 2, min_px), key=lambda m: -np.nonzero(m)[0].mean())
    disc_rows = []
    for name, m in zip(_DISC_NAMES, discs):
        classes[m] = DISC
        levels[m] = disc_label(name)
        r, c = (float(v.mean()) for v in np.nonzero(m))
        points[name] = (r, c)
        disc_rows.append((r, name))
    canal_rows, canal_cols = np.nonzero(canal)
    for m in _components(mask == 1, min_px):
        rr, cc = np.nonzero(m)
        r, c = float(rr.mean()), float(cc.mean())
        near = np.abs(canal_rows - r) < 15.0 / spacing[0]
        if not near.any() or c >= canal_cols[near].mean():
            continue  # posterior elements: background for this task
        classes[m] = BODY
        below = [(rd, n) for rd, n in disc_rows if rd > r]
        if below:  # the body above a disc is that disc's upper vertebra
            name = min(below)[1].split("-")[0]
        elif disc_rows:
            name = "S1"
        else:
            continue
        levels[m] = VERTEBRA_LABELS[name]
        points[name] = (r, c)
    allowed = (1 << classes).astype(np.uint8)
    if "L5-S1" in points:  # the sacrum is not masked: below L5-S1 bone is unknown
        rows = np.arange(mask.shape[0])[:, None]
        unknown = (rows > points["L5-S1"][0]) & (classes == 0)
        allowed[unknown] = (1 << 0) | (1 << BODY)
    return SegSlice(image.astype(np.float32), classes, allowed, levels, points, spacing)


def load_spider_space(data_dir: str | Path) -> list[SegCase]:
    """Every patient of a ``spider-space`` folder (``<patient>/sliceNNN.png`` + ``_mask.png``, ``cases.json``).

    Raises
    ------
    FileNotFoundError
        If the folder has no ``cases.json``.
    """
    root = Path(data_dir)
    meta_path = root / "cases.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"data_dir: no cases.json in {root}")
    meta = json.loads(meta_path.read_text())
    cases = []
    for patient, m in sorted(meta.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]):
        sy, sx = (float(v) for v in str(m["PixelSpacing"]).strip("[]").split(","))
        slices = []
        for s in m["slices"]:
            img = np.asarray(Image.open(root / patient / f"slice{s:03d}.png").convert("L"), np.float32)
            msk = np.asarray(Image.open(root / patient / f"slice{s:03d}_mask.png"))
            slices.append(spider_slice(img, msk, (sy, sx)))
        cases.append(SegCase(f"spider-{patient}", "spider-space", slices,
                             float(m.get("SpacingBetweenSlices", 1.0)), ("vertebral body", "disc", "spinal canal"),
                             {k: m[k] for k in ("Manufacturer", "MagneticFieldStrength") if k in m}))
    return cases


def levels_slice(image: np.ndarray, labels: np.ndarray, points: dict[str, tuple[float, float]]) -> SegSlice:
    """One sagittal plane of a ``lumbar-mri-levels`` volume (1 mm; bodies labelled by level)."""
    body = np.isin(labels, list(VERTEBRA_LABELS.values()))
    classes = np.where(body, BODY, 0).astype(np.uint8)
    allowed = np.full(labels.shape, ALL, np.uint8)
    allowed[body] = 1 << BODY
    names = [n for n in points if "-" not in n]
    if names:  # between the top and the lowest labelled body, what is not a body is no bone
        lo = min(points[n][0] for n in names)
        hi = max(points[n][0] for n in names)
        rows = np.arange(labels.shape[0])[:, None] + np.zeros((1, labels.shape[1]))
        band = (rows > lo) & (rows < hi) & ~body
        allowed[band] = (1 << 0) | (1 << DISC) | (1 << CANAL)
    return SegSlice(image.astype(np.float32), classes, allowed, labels.astype(np.int16), dict(points), (1.0, 1.0))


def load_levels_volumes(data_dir: str | Path, half_width: int = 20) -> list[SegCase]:
    """The central sagittal planes (``mid +- half_width`` voxels) of every ``levels.json`` volume.

    Raises
    ------
    FileNotFoundError
        If the folder has no ``levels.json``.
    """
    import nibabel as nib

    root = Path(data_dir)
    meta_path = root / "levels.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"data_dir: no levels.json in {root}")
    meta = json.loads(meta_path.read_text())
    cases = []
    for name, c in sorted(meta["cases"].items()):
        img = np.asarray(nib.load(str(root / c["image"])).dataobj)
        lab = np.asarray(nib.load(str(root / c["labels"])).dataobj)
        pts = {k: np.asarray(v["centroid"]["vox"], float) for k, v in (c.get("vertebrae") or {}).items()}
        # approximate disc points too (L5-S1, extrapolated): good enough to name a disc or to
        # reveal a body run together with the one below (models.segmentation.label_levels)
        pts.update({k: np.asarray(v["vox"], float) for k, v in (c.get("discs") or {}).items()})
        mid = int(round(float(np.mean([p[2] for p in pts.values()])))) if pts else img.shape[2] // 2
        ks = range(max(0, mid - half_width), min(img.shape[2], mid + half_width + 1))
        slices = [levels_slice(img[:, :, k], lab[:, :, k], {n: (float(p[0]), float(p[1])) for n, p in pts.items()})
                  for k in ks]
        slices = [s for s in slices if (s.classes == BODY).any()]
        if slices:
            cases.append(SegCase(name, str(c.get("dataset", name.split("-")[0])), slices, 1.0, ("vertebral body",),
                                 {"slices": list(ks), "affine": c.get("affine")}))
    return cases


# --------------------------------------------------------------------------- samples


def _rotation(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def _prepared(sl: SegSlice) -> np.ndarray:
    """The slice normalised and low-pass filtered as :func:`models.localizer.resample_slices` does (cached)."""
    cached = getattr(sl, "_prepared_image", None)
    if cached is None:
        sy, sx = sl.spacing
        cached = normalise(sl.image[None])[0]
        sigma = [max(0.0, 0.45 * (PIXEL_MM / sy - 1.0)), max(0.0, 0.45 * (PIXEL_MM / sx - 1.0))]
        if max(sigma) > 0.05:  # before downsampling, against aliasing
            cached = ndimage.gaussian_filter(cached, sigma)
        sl._prepared_image = cached  # type: ignore[attr-defined]
    return cached


def make_sample(sl: SegSlice, rng: np.random.Generator, patch: tuple[int, int] = PATCH,
                augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One training patch: input ``[1, H, W]`` and the allowed-class bits ``[H, W]``."""
    sy, sx = sl.spacing
    img = _prepared(sl)
    fg = np.argwhere(sl.classes > 0)
    centre = fg[rng.integers(len(fg))].astype(float) if len(fg) else np.array(sl.image.shape, float) / 2
    scale = rng.uniform(0.85, 1.15) if augment else 1.0
    rot = _rotation(rng.uniform(-15, 15) if augment else 0.0)
    jitter = rng.normal(0, 25, 2) if augment else np.zeros(2)
    h, w = patch
    rr, qq = np.mgrid[0:h, 0:w].astype(float)
    d = np.stack([(rr - (h - 1) / 2).ravel(), (qq - (w - 1) / 2).ravel()]) * PIXEL_MM * scale
    d = rot @ d + jitter[:, None]
    coords = np.stack([centre[0] + d[0] / sy, centre[1] + d[1] / sx])
    x = ndimage.map_coordinates(img, coords, order=1, cval=0.0, prefilter=False).reshape(h, w)
    bits = ndimage.map_coordinates(sl.allowed, coords, order=0, cval=ALL, prefilter=False).reshape(h, w)
    outside = ((coords[0] < -0.5) | (coords[0] > sl.image.shape[0] - 0.5)
               | (coords[1] < -0.5) | (coords[1] > sl.image.shape[1] - 0.5)).reshape(h, w)
    bits[outside] = 1  # padding is background
    if augment:
        x = augment_intensity(x[None], (x > 0)[None], rng)[0]
    return x[None].astype(np.float32), bits.astype(np.uint8)


def partial_label_loss(logits: torch.Tensor, bits: torch.Tensor, dice_weight: float = 0.5) -> torch.Tensor:
    """Negative log-probability of each pixel's allowed class set, plus soft Dice on fully labelled pixels.

    Parameters
    ----------
    logits
        ``[N, C, H, W]`` raw class scores.
    bits
        ``[N, H, W]`` integer bit masks: bit ``c`` set when class ``c`` is allowed.
    """
    c = logits.shape[1]
    allowed = ((bits.long()[:, None] >> torch.arange(c, device=bits.device)[None, :, None, None]) & 1).bool()
    logp = torch.log_softmax(logits, dim=1)
    nll = -torch.logsumexp(logp.masked_fill(~allowed, -1e4), dim=1).mean()
    exact = allowed.sum(dim=1) == 1
    if dice_weight <= 0 or not exact.any():
        return nll
    p = logp.exp()
    onehot = allowed & exact[:, None]
    dims = (0, 2, 3)
    w = exact[:, None].float()
    inter = (p * onehot * w).sum(dims)
    denom = (p * w).sum(dims) + onehot.float().sum(dims)
    present = onehot[:, 1:].sum(dims) > 0
    dice = (2 * inter[1:] + 1.0) / (denom[1:] + 1.0)
    return nll + dice_weight * (1 - dice[present]).mean() if present.any() else nll


def new_net() -> LevelNet:
    """The segmentation network, randomly initialised."""
    return LevelNet(in_chans=1, widths=WIDTHS, out_chans=len(CLASSES), output="logits")


def train_net(cases: Sequence[SegCase], steps: int = STEPS, batch: int = BATCH, lr: float = 2e-3, seed: int = 0,
              log: Callable[[str], None] | None = None) -> LevelNet:
    """Train one network on ``cases`` (both data sets mixed, :data:`SPIDER_SHARE` fully labelled)."""
    if not cases:
        raise ValueError("cases: nothing to train on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    full = [s for c in cases if len(c.structures) > 1 for s in c.slices]
    part = [s for c in cases if len(c.structures) == 1 for s in c.slices]
    net = new_net().train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        xs, bs = [], []
        for _ in range(batch):
            pool = full if (full and (not part or rng.random() < SPIDER_SHARE)) else part
            x, b = make_sample(pool[rng.integers(len(pool))], rng)
            xs.append(x)
            bs.append(b)
        loss = partial_label_loss(net(torch.from_numpy(np.stack(xs))), torch.from_numpy(np.stack(bs)),
                                  dice_weight=DICE_WEIGHT)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return net.eval()


# --------------------------------------------------------------------------- scoring


def predict_case(segmenter: SpineSegmenter, case: SegCase) -> list[np.ndarray]:
    """Predicted class map of every slice of a case, on the slice's own pixels (the product's path)."""
    arr, aff = case.stack()
    seg = segmenter.segment(arr, aff, list(range(len(case.slices))))
    return [seg.to_source(i, sl.image.shape, aff) for i, sl in enumerate(case.slices)]


def dice_scores(case: SegCase, preds: Sequence[np.ndarray]) -> dict[str, float]:
    """Dice per structure the case masks, over all its slices, on the pixels whose class is known."""
    out = {}
    for name, k in (("vertebral body", BODY), ("disc", DISC), ("spinal canal", CANAL)):
        if name not in case.structures:
            continue
        inter = tot = 0
        for sl, p in zip(case.slices, preds):
            ref = sl.classes == k  # reference classes are set only where exactly one class is allowed
            # a predicted pixel whose truth is open and may be this class counts neither way
            open_k = ((sl.allowed >> k) & 1).astype(bool) & ((sl.allowed & (sl.allowed - 1)) != 0)
            pr = (p == k) & ~open_k
            inter += int((ref & pr).sum())
            tot += int(ref.sum() + pr.sum())
        out[name] = 2.0 * inter / tot if tot else float("nan")
    return out


def save_package(net: LevelNet, out_dir: str | Path, training: dict[str, Any], metrics: dict[str, Any],
                 version: str = VERSION) -> Path:
    """Write ``config.json`` and the fp16 weights of a segmentation package."""
    from safetensors.torch import save_file

    from models.package import sha256_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "model.safetensors").chmod(0o644)  # packages are read by the worker's service user
    cfg = {
        "name": "discus-spine-segmentation",
        "architecture": "LevelNet",
        "task": TASK,
        "version": version,
        "input_size": list(PATCH),
        "in_chans": 1,
        "class_names": list(CLASSES),
        "preprocessing": {"pixel_mm": PIXEL_MM, "grid": "upright sagittal, rows superior->inferior, "
                          "columns anterior->posterior, whole field of view",
                          "normalise": "1st-99.5th percentile of non-zero pixels to 0-1"},
        "postprocessing": {"levels": "connected bodies and discs named by the nearest located level point",
                           "min_area_mm2": MIN_AREA_MM2},
        "model_kwargs": {"widths": list(net.widths)},
        "training": training,
        "metrics": metrics,
        "provenance": provenance(training, metrics),
        "weights": "model.safetensors",
        "sha256": sha256_file(out / "model.safetensors"),
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def provenance(training: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The package's ``provenance`` record: real masks only, case-grouped cross-validation."""
    data = training.get("data", {})
    return {
        "training_data": [
            {"name": "SPIDER T2 SPACE (spider-space; vertebra, disc and canal masks)", "kind": "real",
             "cases": int(data.get("spider-space", 0))},
            {"name": "lumbar-mri-levels (vertebral body masks by level; T2 TSE and water-fat gradient echo)",
             "kind": "real", "cases": int(data.get("lumbar-mri-levels", 0))},
        ],
        "validation": {"method": "internal cross-validation",
                       "description": (f"{training.get('folds', 0)}-fold case-grouped cross-validation; each structure "
                                       "and each measurement is reported only where its own target is met "
                                       "(postprocessing.validated)"),
                       "figures": {k: v for k, v in metrics.items() if k.startswith("dice_")}},
        "domain": {"modality": "MR", "series_roles": ["SAG_T2", "SAG_STIR", "SAG_T1"], "body_part": "lumbar spine"},
    }


# --------------------------------------------------------------------------- cross-validation and shipping


def load_all(data_root: str | Path) -> list[SegCase]:
    """Both real sets under ``data_root`` (``spider-space/`` and ``lumbar-mri-levels/``), whichever are present.

    Raises
    ------
    FileNotFoundError
        If neither is there.
    """
    root = Path(data_root)
    cases: list[SegCase] = []
    if (root / "spider-space" / "cases.json").is_file():
        cases += load_spider_space(root / "spider-space")
    if (root / "lumbar-mri-levels" / "levels.json").is_file():
        cases += load_levels_volumes(root / "lumbar-mri-levels")
    if not cases:
        raise FileNotFoundError(f"data_root: neither spider-space/ nor lumbar-mri-levels/ under {root}")
    return cases


def cross_validate(cases: Sequence[SegCase], out_dir: str | Path, folds: int = 3, steps: int = STEPS,
                   seed: int = 0, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one network per fold, segment its held-out cases, write each fold's package and predictions.

    Writes ``fold<k>/`` packages and ``predictions/<case>.npz`` (the predicted class map of every
    slice, on the slice's pixels) under ``out_dir``, and returns Dice per case and per structure.
    """
    out = Path(out_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    per_case: dict[str, dict[str, float]] = {}
    for k, held in enumerate(case_folds(cases, folds, seed)):
        train = [c for c in cases if c.name not in held]
        if log:
            log(f"fold {k + 1}/{folds}: training on {len(train)} cases, {len(held)} held out")
        net = train_net(train, steps=steps, seed=seed + k, log=log)
        pkg = save_package(net, out / f"fold{k}", {"fold": k, "held_out": sorted(held), "steps": steps}, {})
        seg = SpineSegmenter.from_package(pkg)
        for c in cases:
            if c.name in held:
                preds = predict_case(seg, c)
                np.savez_compressed(out / "predictions" / f"{c.name}.npz", *preds)
                per_case[c.name] = dice_scores(c, preds)
    return {"folds": folds, "steps": steps, "seed": seed, "dice_per_case": per_case,
            **dice_summary(cases, per_case)}


def cv_measurements(cases: Sequence[SegCase], out_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measurements of the out-of-fold predictions against the reference masks, on each case's mid image.

    Predicted bodies and discs are named by the reference level points of that image, so these
    figures measure segmentation and measurement, not level naming; only the levels the product
    reports (T12-L5 and their discs, L1-S1) are scored. Returns the rows
    (``case, level, measurement, unit, predicted, reference``) and the agreement per measurement.
    """
    from models.segmentation import REPORTED_LEVELS, label_levels
    from training.segmentation_eval import agreement, measurement_rows

    rows: list[dict[str, Any]] = []
    for c in cases:
        path = Path(out_dir) / "predictions" / f"{c.name}.npz"
        if not path.is_file():
            continue
        with np.load(path) as z:
            pred = z[f"arr_{c.mid}"]
        sl = c.slices[c.mid]
        rows += [r for r in measurement_rows(c.name, label_levels(pred, sl.points, sl.spacing), sl.levels, c.affine)
                 if r["level"] in REPORTED_LEVELS]  # validated on what the product reports
    return rows, agreement(rows)


def dice_summary(cases: Sequence[SegCase], per_case: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean Dice per structure over cases, overall and per data set."""
    out: dict[str, Any] = {}
    for name, key in (("vertebral body", "dice_body"), ("disc", "dice_disc"), ("spinal canal", "dice_canal")):
        vals = [per_case[c.name][name] for c in cases if c.name in per_case and name in per_case[c.name]]
        vals = [v for v in vals if np.isfinite(v)]
        if vals:
            out[key] = round(float(np.mean(vals)), 4)
        for ds in sorted({c.dataset for c in cases}):
            dv = [per_case[c.name][name] for c in cases if c.dataset == ds and c.name in per_case
                  and name in per_case[c.name] and np.isfinite(per_case[c.name][name])]
            if dv:
                out.setdefault("by_dataset", {}).setdefault(ds, {})[key] = round(float(np.mean(dv)), 4)
    return out


def main(args: list[str] | None = None) -> None:
    """``python -m training.segmentation DATA_ROOT OUT [--folds K] [--steps N] [--cv-steps N]``."""
    import argparse

    ap = argparse.ArgumentParser(description="Cross-validate and train the sagittal spine segmenter.")
    ap.add_argument("data_root", type=Path)
    ap.add_argument("out", type=Path, help="cross-validation folder")
    ap.add_argument("--package", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "packages" / TASK)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--cv-steps", type=int, default=CV_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-cv", action="store_true")
    ap.add_argument("--finalize-only", action="store_true",
                    help="only score the cross-validation predictions into the existing package and its card")
    a = ap.parse_args(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cases = load_all(a.data_root)
    print(f"{len(cases)} cases, {sum(len(c.slices) for c in cases)} slices", flush=True)
    cv_path = a.out / "cv.json"
    if a.finalize_only:
        finalize_package(cases, a.out, a.package)
        return
    if not a.skip_cv:
        cv = cross_validate(cases, a.out, folds=a.folds, steps=a.cv_steps or a.steps, seed=a.seed,
                            log=lambda m: print(m, flush=True))
        cv_path.write_text(json.dumps(cv, indent=2))
        print(json.dumps({k: v for k, v in cv.items() if k != "dice_per_case"}, indent=2), flush=True)
    cv = json.loads(cv_path.read_text()) if cv_path.is_file() else {}
    net = train_net(cases, steps=a.steps, seed=a.seed, log=lambda m: print(m, flush=True))
    counts = {"spider-space": sum(c.dataset == "spider-space" for c in cases),
              "lumbar-mri-levels": sum(c.dataset != "spider-space" for c in cases)}
    training = {"data": counts, "folds": cv.get("folds", 0), "cv_steps": cv.get("steps"), "steps": a.steps,
                "batch_size": BATCH, "patch": list(PATCH), "seed": a.seed, "module": "models.segmentation",
                "command": (f"discus train segmentation --folds {a.folds} --cv-steps {a.cv_steps or a.steps} "
                            f"--steps {a.steps}")}
    metrics = {k: v for k, v in cv.items() if k.startswith("dice_") and k != "dice_per_case"}
    metrics["evaluation"] = f"{cv.get('folds', 0)}-fold case-grouped cross-validation"
    save_package(net, a.package, training, metrics)
    finalize_package(cases, a.out, a.package)
    print(f"package written to {a.package}", flush=True)


#: Targets per structure (Dice) and per measurement unit (mean absolute error, ICC(A,1)), from the
#: product's requirements: SPINEPS reaches 0.93 Dice for vertebrae on SPIDER.
DICE_TARGETS = {"vertebral body": 0.90, "disc": 0.88, "spinal canal": 0.85}
MAE_TARGETS = {"mm": 1.0, "deg": 3.0}
ICC_TARGET = 0.90
#: Measurements derived from others: reported when every measurement they rest on is.
DERIVED_FROM = {
    "wedge ratio": ("anterior body height", "posterior body height"),
    "biconcavity ratio": ("middle body height", "posterior body height"),
    "body height loss": ("anterior body height", "middle body height", "posterior body height"),
    "slip percent": ("slip",),
}
#: Derived grades and the measurements they rest on.
CATEGORY_BASIS = {
    "Genant grade": ("anterior body height", "middle body height", "posterior body height"),
    "Meyerding grade": ("slip",),
    "central canal stenosis": ("canal AP diameter",),
}


def validation_table(cv: dict[str, Any], agreement: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the package may report: each structure by its Dice, each measurement by its agreement.

    Written into ``postprocessing.validated``; the worker reports a structure (in the SEG) or a
    measurement (in the SR, key image and draft report) only where ``meets_target`` is true.
    """
    structures = {}
    for name, target in DICE_TARGETS.items():
        key = f"dice_{name.split()[-1]}"
        dice = cv.get(key)
        structures[name] = {"dice": dice, "target": target,
                            "meets_target": bool(isinstance(dice, (int, float)) and dice >= target)}
    measurements: dict[str, Any] = {}
    for name, a in agreement.items():
        if a["unit"] not in MAE_TARGETS:
            continue
        ok = a["n"] >= 10 and a["mae"] <= MAE_TARGETS[a["unit"]] and a["icc_a1"] >= ICC_TARGET
        measurements[name] = {**a, "target_mae": MAE_TARGETS[a["unit"]], "target_icc": ICC_TARGET,
                              "meets_target": bool(ok)}
    for name, base in DERIVED_FROM.items():
        ok = all(measurements.get(b, {}).get("meets_target") for b in base)
        measurements[name] = {**agreement.get(name, {}), "derived_from": list(base), "meets_target": bool(ok)}
    categories = {name: {"derived_from": list(base),
                         "meets_target": all(measurements.get(b, {}).get("meets_target") for b in base)}
                  for name, base in CATEGORY_BASIS.items()}
    return {"structures": structures, "measurements": measurements, "categories": categories}


def finalize_package(cases: Sequence[SegCase], cv_dir: str | Path, package: str | Path) -> Path:
    """Score the cross-validation predictions' measurements, record what is validated, write the card.

    The weights are not touched (their sha256 stays); ``config.json`` gets the agreement figures,
    ``postprocessing.validated`` and the provenance, the package folder ``cv_bland_altman.png`` and
    ``MODEL_CARD.md``; every measured pair goes to ``cv_dir/cv_measurements.csv``, not into the
    package (it names the training cases and holds measurements of their reference masks).
    """
    import csv

    from training.segmentation_eval import plot_bland_altman

    pkg = Path(package)
    cv = json.loads((Path(cv_dir) / "cv.json").read_text())
    rows, agreement = cv_measurements(cases, cv_dir)
    with open(Path(cv_dir) / "cv_measurements.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "level", "measurement", "unit", "predicted", "reference"])
        w.writeheader()
        w.writerows(rows)
    plot_bland_altman(rows, pkg / "cv_bland_altman.png")
    cfg = json.loads((pkg / "config.json").read_text())
    validated = validation_table(cv, agreement)
    cfg["postprocessing"]["validated"] = validated
    cfg["metrics"]["measurements"] = agreement
    cfg["metrics"]["by_dataset"] = cv.get("by_dataset", {})
    cfg["provenance"] = provenance(cfg["training"], cfg["metrics"])
    (pkg / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_model_card(pkg, cfg, cv)
    return pkg



def _fmt(v: Any, nd: int = 3) -> str:
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_model_card(package: str | Path, cfg: dict[str, Any], cv: dict[str, Any]) -> Path:
    """``MODEL_CARD.md`` of a segmentation package from its config and cross-validation."""
    from models.provenance import Provenance

    pkg = Path(package)
    val = cfg["postprocessing"]["validated"]
    tr = cfg["training"]
    lines = [
        f"# {cfg['name']} {cfg['version']}: vertebral bodies, discs and spinal canal on sagittal MRI",
        "",
        f"**Provenance:** {Provenance.from_dict(cfg['provenance']).one_line()}",
        "",
        "## What it does",
        "Labels vertebral bodies, intervertebral discs and the spinal canal on the midline sagittal image of a",
        "lumbar MRI series (and its two neighbours), after level localization; bodies and discs are named by the",
        "located level points. The measurement module (models/measurements.py) turns the labelled midline",
        "image into disc and body heights, slip, canal AP diameter and L1-S1 lordosis, with Genant, Meyerding",
        "and canal stenosis grades. The same code measured the predicted and the reference masks below.",
        "",
        "## What reaches a radiologist",
        "Each structure (in the DICOM SEG) and each measurement (in the SR, key image and draft report) is",
        "reported only where its own cross-validated figure meets the target below; the rest is withheld and",
        "listed as not reported, unless a site sets `report_below_target_models = true`.",
        "",
        "| structure | Dice (CV) | target | reported |",
        "|---|---|---|---|",
    ]
    for name, v in val["structures"].items():
        lines.append(f"| {name} | {_fmt(v['dice'])} | {v['target']:.2f} | {'yes' if v['meets_target'] else 'no'} |")
    lines += ["", "| measurement | n | MAE | bias | ICC(A,1) | target | reported |", "|---|---|---|---|---|---|---|"]
    for name, v in val["measurements"].items():
        if "derived_from" in v:
            lines.append(f"| {name} | {v.get('n', '')} | {_fmt(v.get('mae', ''))} {v.get('unit', '')} | "
                         f"{_fmt(v.get('bias', ''))} | {_fmt(v.get('icc_a1', ''))} | "
                         f"from {', '.join(v['derived_from'])} | {'yes' if v['meets_target'] else 'no'} |")
        else:
            lines.append(f"| {name} | {v['n']} | {v['mae']:.2f} {v['unit']} | {v['bias']:+.2f} | {v['icc_a1']:.3f} | "
                         f"MAE <= {v['target_mae']:g} {v['unit']}, ICC >= {v['target_icc']:.2f} | "
                         f"{'yes' if v['meets_target'] else 'no'} |")
    lines += ["", "| grade | rests on | reported |", "|---|---|---|"]
    for name, v in val["categories"].items():
        lines.append(f"| {name} | {', '.join(v['derived_from'])} | {'yes' if v['meets_target'] else 'no'} |")
    by_ds = cv.get("by_dataset", {})
    lines += [
        "",
        "## Validation",
        f"- {cv.get('folds')}-fold cross-validation, grouped by patient/volume, each data set spread over the folds;",
        f"  each fold's network trained {cv.get('steps')} steps; the shipped network, trained on all cases, "
        f"{tr.get('steps')} steps.",
        "- Dice per structure is computed where the reference says exactly which class a pixel is (the sacrum is",
        "  never masked in spider-space; lumbar-mri-levels masks only bodies, T11/T12-L5), mean over cases:",
    ]
    for ds, v in by_ds.items():
        lines.append(f"  - {ds}: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
    lines += [
        "- Measurements: each held-out case's midline image (largest body area), predicted mask named by the",
        "  reference level points (so these figures score segmentation and measurement, not level naming: the",
        "  localizer has its own card), measured alike on prediction and reference; only the levels the",
        "  product reports (T12-L5, their discs, L1-S1). Bland-Altman plots: `cv_bland_altman.png`; every",
        "  pair is written beside the cross-validation (`cv_measurements.csv`), not shipped.",
        "- The reference masks are themselves one annotator's; SPIDER's vertebra masks include the posterior",
        "  elements, which this package leaves out (bodies are the vertebra regions in front of the canal).",
        "",
        "## Training data",
        f"- {tr['data'].get('spider-space', 0)} SPIDER patients (spider-space: T2 SPACE, Siemens 1.5 T/3 T, up to",
        "  11 central sagittal slices each, vertebra/disc/canal masks; van der Graaf et al., Sci Data 11:264,",
        "  2024, CC BY 4.0; training patients only).",
        f"- {tr['data'].get('lumbar-mri-levels', 0)} volumes of lumbar-mri-levels (VB3 MyoSegmenTUM water-fat gradient",
        "  echo 3 T, VB2 T2 TSE 1.5 T; vertebral bodies by level; the 41 sagittal planes within 20 mm of the mid-plane).",
        "- Partial labels: every pixel carries the set of classes it may be (lumbar-mri-levels knows only",
        "  'body' or 'not a body' between its top and lowest labelled body); the loss is the negative log",
        "  of the probability of that set plus a soft Dice term on exactly labelled pixels.",
        f"- Patches of {tr['patch'][0]}x{tr['patch'][1]} pixels on a 1 mm upright grid, scale +-15 %, rotation "
        "+-15 deg, contrast (gamma, inversion, tone curves), bias field, noise, blur.",
        "",
        "## Limits",
        "- No T1 or STIR with masks: on those contrasts the package is untested (the inversion augmentation is",
        "  not a validation).",
        "- Healthy volunteers (lumbar-mri-levels) and a modest number of SPIDER patients: severe fractures, high-",
        "  grade slips and post-operative spines are rare or absent in the training data.",
        "- 2-D, one image: a scoliotic spine leaves the midline image and its measurements become unreliable.",
        "- The sacrum is not segmented; L5-S1 slip and lordosis use the L5-S1 disc's lower border as S1's",
        "  endplate.",
        "",
        "## Reproduce",
        f"`{tr.get('command', 'discus train segmentation')}` (reads `../shared/data/spider-space` and",
        "`../shared/data/lumbar-mri-levels`); `discus evaluate segmentation DIR --out OUT` scores any folder in",
        "either format.",
        "",
    ]
    path = pkg / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    main()
