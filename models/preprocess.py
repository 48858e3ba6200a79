"""Preprocessing built from a model's configuration, shared by training and inference.

Raw crops (float arrays ``[N, H, W]`` in scanner units: MR signal, CT Hounsfield
units, X-ray pixel values) become network input ``[N, C, h, w]`` in three steps:
intensity to [0, 1] (:meth:`Preprocessor.to_unit`), resize to the network input
(:meth:`Preprocessor.resize`), standardise and repeat to ``C`` channels
(:meth:`Preprocessor.standardize`). Training inserts its augmentations between
the resize and the standardisation, so both see the same intensities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import PreprocessError

#: Intensity modes: per-image percentiles (MR), fixed window (CT), per-image min-max, fixed scale.
MODES: tuple[str, ...] = ("percentile", "window", "minmax", "scale")

#: Defaults per mode, merged under the configured values.
DEFAULTS: dict[str, dict[str, Any]] = {
    "percentile": {"low": 0.5, "high": 99.5},
    "window": {"center": 40.0, "width": 400.0},
    "minmax": {},
    "scale": {"scale": 255.0},
}


class Preprocessor:
    """Turn raw crops into network input, as a model's configuration says.

    Parameters
    ----------
    preprocessing : dict
        ``mode`` (one of :data:`MODES`) and its parameters: ``low``/``high``
        percentiles, ``center``/``width`` of a window, or ``scale``; ``mean`` and
        ``std`` of the standardisation (default 0.5 and 0.25); ``interpolation``
        (``bilinear`` or ``bicubic``).
    input_size : tuple of int
        Network input ``(h, w)``.
    in_chans : int
        Network input channels (1 or 3; grey images are repeated).

    Raises
    ------
    PreprocessError
        (a ``ValueError``) naming the parameter when a value is invalid.
    """

    def __init__(self, preprocessing: dict[str, Any], input_size: tuple[int, int], in_chans: int = 1) -> None:
        if not isinstance(preprocessing, dict):
            raise PreprocessError(f"preprocessing: must be a mapping, got {type(preprocessing).__name__}")
        mode = preprocessing.get("mode", "percentile")
        if mode not in MODES:
            raise PreprocessError(f"preprocessing.mode: unknown {mode!r}; known: {', '.join(MODES)}")
        self.params = {**DEFAULTS[mode], **preprocessing, "mode": mode}
        self.mode = mode
        if mode == "percentile" and not 0 <= self.params["low"] < self.params["high"] <= 100:
            raise PreprocessError(f"preprocessing.low/high: need 0 <= low < high <= 100, got {self.params}")
        if mode == "window" and not float(self.params["width"]) > 0:
            raise PreprocessError(f"preprocessing.width: must be > 0, got {self.params['width']!r}")
        if mode == "scale" and not float(self.params["scale"]) > 0:
            raise PreprocessError(f"preprocessing.scale: must be > 0, got {self.params['scale']!r}")
        self.mean = float(self.params.get("mean", 0.5))
        self.std = float(self.params.get("std", 0.25))
        if not self.std > 0:
            raise PreprocessError(f"preprocessing.std: must be > 0, got {self.std!r}")
        self.interpolation = self.params.get("interpolation", "bilinear")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise PreprocessError(f"preprocessing.interpolation: bilinear or bicubic, got {self.interpolation!r}")
        size = tuple(int(v) for v in input_size)
        if len(size) != 2 or min(size) < 1:
            raise PreprocessError(f"input_size: must be (h, w), got {input_size!r}")
        self.input_size: tuple[int, int] = size  # type: ignore[assignment]
        if in_chans not in (1, 3):
            raise PreprocessError(f"in_chans: must be 1 or 3, got {in_chans!r}")
        self.in_chans = in_chans

    @classmethod
    def from_config(cls, config: Any) -> Preprocessor:
        """Build from a :class:`models.config.ModelConfig`."""
        return cls(config.preprocessing, config.input_size, config.in_chans)

    @staticmethod
    def _check(batch: np.ndarray) -> np.ndarray:
        a = np.asarray(batch, dtype=np.float32)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or min(a.shape) < 1:
            raise PreprocessError(f"batch: expected [N, H, W] images, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise PreprocessError("batch: contains NaN or infinite values")
        return a

    def to_unit(self, batch: np.ndarray) -> np.ndarray:
        """Intensities to [0, 1], per the configured mode. ``[N, H, W]`` float32 in and out."""
        a = self._check(batch)
        p = self.params
        if self.mode == "percentile":
            lo = np.percentile(a, p["low"], axis=(1, 2), keepdims=True)
            hi = np.percentile(a, p["high"], axis=(1, 2), keepdims=True)
        elif self.mode == "window":
            lo = np.full((a.shape[0], 1, 1), float(p["center"]) - float(p["width"]) / 2, np.float32)
            hi = lo + float(p["width"])
        elif self.mode == "minmax":
            lo = a.min(axis=(1, 2), keepdims=True)
            hi = a.max(axis=(1, 2), keepdims=True)
        else:
            lo = np.zeros((a.shape[0], 1, 1), np.float32)
            hi = lo + float(p["scale"])
        # a blank image stays blank instead of dividing by zero
        span = np.where(hi - lo > 1e-6, hi - lo, 1.0)
        return np.clip((a - lo) / span, 0.0, 1.0).astype(np.float32)

    def resize(self, unit: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[N, H, W]`` in [0, 1] -> ``[N, 1, h, w]`` tensor at the network input size."""
        t = torch.as_tensor(unit, dtype=torch.float32)
        if t.ndim == 3:
            t = t[:, None]
        if tuple(t.shape[-2:]) != self.input_size:
            t = F.interpolate(t, size=self.input_size, mode=self.interpolation, align_corners=False)
            t = t.clamp_(0.0, 1.0)
        return t

    def standardize(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, 1, h, w]`` in [0, 1] -> standardised ``[N, C, h, w]``."""
        t = (t - self.mean) / self.std
        return t.expand(-1, self.in_chans, -1, -1).contiguous() if self.in_chans > 1 else t

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        """Raw crops ``[N, H, W]`` -> network input ``[N, C, h, w]`` (float32, CPU)."""
        return self.standardize(self.resize(self.to_unit(batch)))


def resize_image(image: np.ndarray, shape: tuple[int, int], antialias: bool = True) -> np.ndarray:
    """A whole 2D image to ``shape`` (rows, columns): bilinear, pixel centres aligned, antialiased by default.

    How a radiograph becomes a classifier's square crop, for training images
    (8-bit JPEG) and scanner images (12-16 bit DICOM) alike; a package's
    ``preprocessing["antialias"]`` says which way it was trained. Antialiasing
    keeps a 3000-pixel detector image from aliasing where a 331-pixel JPEG would
    not. Intensities stay in their units (resizing is linear, so the percentile
    window of :class:`Preprocessor` sees the same image whatever the bit depth).

    Raises
    ------
    PreprocessError
        If ``image`` is not 2D or ``shape`` is not two positive ints.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise PreprocessError(f"image: expected a 2D image, got shape {img.shape}")
    rows, cols = (int(v) for v in shape)
    if rows < 1 or cols < 1:
        raise PreprocessError(f"shape: must be two positive ints, got {shape!r}")
    if img.shape == (rows, cols):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    out = F.interpolate(t, size=(rows, cols), mode="bilinear", align_corners=False, antialias=antialias)
    return out[0, 0].numpy().astype(np.float32)
