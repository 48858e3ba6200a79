"""Disc grading on sagittal MR: Pfirrmann grade and seven findings per located disc.

One network reads an upright sagittal crop centred on a disc point found by the
level localizer (``CROP_SPECS["mr_disc_grading"]``, the same crop in training
and inference) and has several heads on one shared feature vector: the
Pfirrmann grade (5-way softmax) and one logit each for herniation, bulging,
narrowing, spondylolisthesis, Modic change (any type) and upper and lower
endplate defects. Its outputs are the logits of all heads side by side (see
:data:`OUTPUT_NAMES`), so the package is an ordinary single-file package of a
registered architecture; this module splits them, applies each head's
calibration temperature and decision threshold from ``config.json``, and checks
each crop against the package's input-domain reference.

The product's disc category (normal, bulging, herniation) follows from the
herniation and bulging findings (:func:`disc_category`).

Numpy, scipy and torch only (no pydicom).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import ModelConfig
from models.crops import CROP_SPECS, CropGeometry, crop_at_disc
from models.errors import PackageError, PreprocessError
from models.package import load_package
from models.preprocess import Preprocessor
from models.registry import Classifier

#: Task name of the package.
TASK = "mr_disc_grading"
#: Disc levels the grader reports, cranial to caudal.
LUMBAR_DISCS: tuple[str, ...] = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
#: Pfirrmann grades in output order.
PFIRRMANN_GRADES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: Binary heads in output order (after the Pfirrmann logits).
BINARY_HEADS: tuple[str, ...] = (
    "herniation", "bulging", "narrowing", "spondylolisthesis", "modic", "endplate_upper", "endplate_lower",
)
#: Every head: the Pfirrmann grade, then the binary findings.
HEADS: tuple[str, ...] = ("pfirrmann", *BINARY_HEADS)
#: Network outputs (the package's ``class_names``), in logit order.
OUTPUT_NAMES: tuple[str, ...] = (*(f"pfirrmann_{g}" for g in PFIRRMANN_GRADES), *BINARY_HEADS)


def split_logits(logits: np.ndarray) -> dict[str, np.ndarray]:
    """``[N, 12]`` network outputs -> ``{"pfirrmann": [N, 5], "herniation": [N], ...}``.

    Raises
    ------
    ValueError
        If the outputs are not ``[N, len(OUTPUT_NAMES)]``.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(OUTPUT_NAMES):
        raise ValueError(f"logits: expected [N, {len(OUTPUT_NAMES)}], got shape {z.shape}")
    k = len(PFIRRMANN_GRADES)
    out = {"pfirrmann": z[:, :k]}
    out.update({h: z[:, k + i] for i, h in enumerate(BINARY_HEADS)})
    return out


def head_probabilities(logits: np.ndarray, temperatures: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Calibrated probabilities per head: Pfirrmann ``[N, 5]`` (softmax), each finding ``[N]`` (sigmoid).

    ``temperatures`` divides each head's logits (1 where a head has none).

    Raises
    ------
    ValueError
        If the outputs have the wrong shape or a temperature is not positive.
    """
    temps = dict(temperatures or {})
    out: dict[str, np.ndarray] = {}
    for head, z in split_logits(logits).items():
        t = float(temps.get(head, 1.0))
        if not t > 0:
            raise ValueError(f"temperatures: {head} must be > 0, got {t!r}")
        if head == "pfirrmann":
            e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
            out[head] = e / e.sum(axis=1, keepdims=True)
        else:
            out[head] = 1.0 / (1.0 + np.exp(-z / t))
    return out


def disc_category(herniation: bool, bulging: bool) -> str:
    """The product's disc category from the two findings: herniation wins over bulging."""
    return "herniation" if herniation else "bulging" if bulging else "normal"


def image_volume(
    image: np.ndarray, pixel_spacing: Sequence[float], anterior_left: bool = True, slices: int = 3,
    slice_mm: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A single upright sagittal image as the ``[slice, row, column]`` stack the localizer takes.

    The image is repeated ``slices`` times (the localizer needs at least two images
    and reads each with its neighbours) at ``slice_mm`` spacing along the patient's
    left-right axis; rows run superior to inferior, columns anterior to posterior
    (``anterior_left``) or posterior to anterior. ``pixel_spacing`` is (row, column) mm.

    Raises
    ------
    ValueError
        If the image is not 2-D or a spacing is not positive.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image: expected a 2-D image, got shape {img.shape}")
    row_mm, col_mm = (float(v) for v in pixel_spacing)
    if not (row_mm > 0 and col_mm > 0 and slice_mm > 0) or slices < 2:
        raise ValueError(f"pixel_spacing/slice_mm/slices: need positive spacings and >= 2 slices, "
                         f"got {pixel_spacing!r}, {slice_mm!r}, {slices!r}")
    a = np.eye(4)
    a[:3, 0] = [0.0, col_mm if anterior_left else -col_mm, 0.0]
    a[:3, 1] = [0.0, 0.0, -row_mm]
    a[:3, 2] = [-slice_mm if anterior_left else slice_mm, 0.0, 0.0]  # right-handed: normal = row x column
    return np.repeat(img[None], slices, axis=0), a


def disc_crop(array: np.ndarray, affine: np.ndarray, disc_mm: Sequence[float], out_px: int) -> tuple[np.ndarray, CropGeometry, int]:
    """The grading crop at a disc point, on the image of ``array`` nearest the point.

    The one crop path of training and inference (:func:`models.crops.crop_at_disc`):
    the point is moved onto that image's plane first, so the crop holds that
    image's own pixels (resampled). Returns the crop, its geometry and the slice index.
    """
    crop, geom, k, _ = crop_at_disc(np.asarray(array), np.asarray(affine, float), np.asarray(disc_mm, float),
                                    CROP_SPECS[TASK], out_px)
    return crop, geom, k


@dataclass
class DiscGrade:
    """The grading of one located disc.

    ``p_pfirrmann`` are the calibrated probabilities of grades 1-5, ``probabilities``
    those of the binary findings, ``findings`` whether each reaches its threshold.
    ``in_domain`` is False when the crop lies outside the package's validated input
    domain; such a grade should be reported as a warning, not as a finding.
    """

    level: str
    point_mm: tuple[float, float, float]
    slice_index: int
    pfirrmann: int
    p_pfirrmann: tuple[float, ...]
    probabilities: dict[str, float]
    findings: dict[str, bool]
    category: str
    in_domain: bool
    domain_distance: float
    geometry: CropGeometry
    crop: np.ndarray = field(repr=False)


class DiscGrader:
    """A loaded ``mr_disc_grading`` package: crops, grades and explains located discs.

    Parameters
    ----------
    model : Classifier
        The network in eval mode (outputs :data:`OUTPUT_NAMES`).
    config : ModelConfig
        Its configuration (``calibration``, ``postprocessing``, ``domain_check``).
    domain : FeatureDomain, optional
        Input-domain reference; without it every crop counts as in domain.

    Raises
    ------
    PackageError
        If the configuration's outputs are not :data:`OUTPUT_NAMES`.
    """

    def __init__(self, model: Classifier, config: ModelConfig, domain: Any | None = None) -> None:
        if tuple(config.class_names) != OUTPUT_NAMES:
            raise PackageError(f"package {config.name}: outputs {config.class_names} are not {list(OUTPUT_NAMES)}")
        self.model = model.float().eval()
        self.config = config
        self.preprocess = Preprocessor.from_config(config)
        self.crop_px = int(config.preprocessing.get("crop_px", config.input_size[0]))
        self.temperatures = {h: float(t) for h, t in config.calibration.get("temperatures", {}).items()}
        self.thresholds = {h: float(config.postprocessing.get("thresholds", {}).get(h, 0.5)) for h in BINARY_HEADS}
        self.domain = domain

    @classmethod
    def from_package(cls, path: str | Path) -> DiscGrader:
        """Load and verify a package (weights and domain reference checked against their SHA-256).

        Raises
        ------
        PackageError
            If the package is incomplete, a hash differs, or it is not a disc-grading package.
        """
        model, cfg = load_package(path)
        if cfg.task != TASK:
            raise PackageError(f"package {path}: task is {cfg.task!r}, expected {TASK!r}")
        domain = None
        if cfg.domain_check:
            from models.domain import FeatureDomain

            domain = FeatureDomain.load(Path(path) / str(cfg.domain_check["file"]))
        return cls(model, cfg, domain)  # type: ignore[arg-type]

    def outputs(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw crops ``[N, H, W]`` -> (logits ``[N, 12]``, penultimate features ``[N, D]``).

        Raises
        ------
        PreprocessError
            If the crops are not ``[N, H, W]`` with N >= 1 or hold non-finite values.
        """
        from models.domain import penultimate_features

        a = np.asarray(crops, dtype=np.float32)
        if a.ndim != 3 or len(a) == 0:
            raise PreprocessError(f"crops: expected [N, H, W] with N >= 1, got shape {a.shape}")
        with torch.inference_mode():
            feats, logits = penultimate_features(
                self.model, self.preprocess(a), self.domain.pooled if self.domain is not None else True)
        return logits.float().numpy(), feats.numpy()

    def grade(self, array: np.ndarray, affine: np.ndarray, disc_points: Mapping[str, Sequence[float]]) -> list[DiscGrade]:
        """Grade every lumbar disc in ``disc_points`` (level name -> point in patient mm).

        Levels other than :data:`LUMBAR_DISCS` are ignored; the result follows
        :data:`LUMBAR_DISCS` order. Each crop is taken on the image nearest its point.
        """
        levels = [lv for lv in LUMBAR_DISCS if lv in disc_points]
        if not levels:
            return []
        made = [disc_crop(array, affine, disc_points[lv], self.crop_px) for lv in levels]
        crops = np.stack([m[0] for m in made])
        logits, feats = self.outputs(crops)
        probs = head_probabilities(logits, self.temperatures)
        if self.domain is not None:
            dist = self.domain.distance(feats)
            inside = dist <= self.domain.threshold
        else:
            dist, inside = np.zeros(len(levels)), np.ones(len(levels), bool)
        grades = []
        for i, lv in enumerate(levels):
            p = {h: float(probs[h][i]) for h in BINARY_HEADS}
            found = {h: p[h] >= self.thresholds[h] for h in BINARY_HEADS}
            grades.append(DiscGrade(
                level=lv, point_mm=tuple(float(v) for v in disc_points[lv]), slice_index=made[i][2],
                pfirrmann=int(PFIRRMANN_GRADES[int(np.argmax(probs["pfirrmann"][i]))]),
                p_pfirrmann=tuple(float(v) for v in probs["pfirrmann"][i]), probabilities=p, findings=found,
                category=disc_category(found["herniation"], found["bulging"]),
                in_domain=bool(inside[i]), domain_distance=float(dist[i]), geometry=made[i][1], crop=made[i][0],
            ))
        return grades

    def explain(self, crops: np.ndarray, heads: Sequence[str]) -> np.ndarray:
        """Grad-CAM heatmaps ``[N, H, W]`` in [0, 1] of one head per crop, in the crops' pixels.

        A binary head is explained through its logit, the Pfirrmann head through
        the predicted grade's logit.

        Raises
        ------
        ValueError
            If ``heads`` does not name one known head per crop.
        """
        from models.gradcam import GradCamExplainer

        a = np.asarray(crops, dtype=np.float32)
        if len(heads) != len(a) or any(h not in HEADS for h in heads):
            raise ValueError(f"heads: need one of {HEADS} per crop ({len(a)}), got {list(heads)}")
        x = self.preprocess(a)
        targets = []
        with torch.inference_mode():
            pf = self.model(x)[:, :len(PFIRRMANN_GRADES)].argmax(1).tolist()
        for i, h in enumerate(heads):
            targets.append(pf[i] if h == "pfirrmann" else OUTPUT_NAMES.index(h))
        heat = torch.from_numpy(GradCamExplainer(self.model)(x, targets))[:, None]
        if tuple(heat.shape[-2:]) != a.shape[1:]:
            heat = torch.nn.functional.interpolate(heat, size=a.shape[1:], mode="bilinear", align_corners=False)
        return heat[:, 0].clamp(0.0, 1.0).numpy()


__all__ = [
    "BINARY_HEADS", "DiscGrade", "DiscGrader", "HEADS", "LUMBAR_DISCS", "OUTPUT_NAMES", "PFIRRMANN_GRADES", "TASK",
    "disc_category", "disc_crop", "head_probabilities", "image_volume", "split_logits",
]
