"""Input-domain check: is a crop like the inputs a package was validated on?

The reference is the distribution of the network's features over its training
crops (the input of its last linear layer, plus pooled statistics of the layers
Grad-CAM looks at): their mean and a shrunk covariance. A new crop's Mahalanobis distance to that distribution is
compared with a threshold set at a high percentile of the distances of the
package's own held-out crops. A crop beyond the threshold is out of domain: the
pipeline reports no finding for it, only a warning with the distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from models.errors import PackageError

#: File of a package holding the reference statistics.
DOMAIN_FILE = "domain.safetensors"
#: Feature kinds a reference may be fitted on (stored in its file).
FEATURES_PENULTIMATE = "penultimate"
FEATURES_POOLED = "penultimate+pooled"
#: Percentile of the held-out distances at which the threshold is set.
DEFAULT_PERCENTILE = 99.0


def last_linear(model: nn.Module) -> nn.Linear:
    """The network's last ``nn.Linear`` (its classification layer).

    Raises
    ------
    ValueError
        If the network has no linear layer.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear layer to read features from")
    return linears[-1]


def penultimate_features(model: nn.Module, x: torch.Tensor, pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)``: the reference features of a batch and the network's output.

    The features are the input of the last linear layer, followed, for a
    registered classifier, by the mean and standard deviation over space (or
    tokens) of each layer Grad-CAM looks at (``cam_target_layers(multilayer=True)``):
    the deep features say what the network sees, the pooled earlier ones how the
    image looks (texture, contrast), which is where images of another kind differ.
    With ``pooled=False`` only the first part (references of the first kind,
    :data:`FEATURES_PENULTIMATE`).
    """
    captured: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    handles = [last_linear(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))]
    layers = model.cam_target_layers(multilayer=True) if pooled and hasattr(model, "cam_target_layers") else []

    def pool(_m: nn.Module, _i: object, out: object) -> None:
        t = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(t, torch.Tensor) and t.ndim == 4:
            pooled.extend([t.detach().float().mean((2, 3)), t.detach().float().std((2, 3), correction=0)])
        elif isinstance(t, torch.Tensor) and t.ndim == 3:
            pooled.extend([t.detach().float().mean(1), t.detach().float().std(1, correction=0)])

    try:
        handles += [layer.register_forward_hook(pool) for layer in layers]
    except (NotImplementedError, AttributeError):
        pass
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    feats = torch.cat([captured[-1].float().flatten(1), *pooled], dim=1)
    return feats, logits


@dataclass
class FeatureDomain:
    """Mean and precision (inverse shrunk covariance) of reference features, and a threshold.

    Parameters
    ----------
    mean : np.ndarray
        ``[D]`` feature mean.
    precision : np.ndarray
        ``[D, D]`` inverse of the shrunk covariance.
    threshold : float
        Mahalanobis distance above which an input is out of domain.
    percentile : float
        Percentile of the held-out distances the threshold was set at.
    features : str
        Which features (:data:`FEATURES_POOLED`, or :data:`FEATURES_PENULTIMATE` for
        references of the first kind).

    Raises
    ------
    ValueError
        If shapes disagree or the threshold is not positive.
    """

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    percentile: float = DEFAULT_PERCENTILE
    features: str = FEATURES_POOLED

    @property
    def pooled(self) -> bool:
        """Whether the reference's features include the pooled Grad-CAM layers."""
        return self.features == FEATURES_POOLED

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        self.precision = np.asarray(self.precision, dtype=np.float64)
        d = self.mean.size
        if self.precision.shape != (d, d):
            raise ValueError(f"precision: expected [{d}, {d}], got {self.precision.shape}")
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold: must be a positive number, got {self.threshold!r}")

    @classmethod
    def fit(
        cls, reference: np.ndarray, heldout: np.ndarray, percentile: float = DEFAULT_PERCENTILE
    ) -> FeatureDomain:
        """Fit on training features; set the threshold on held-out features.

        The covariance is shrunk towards a scaled identity (Ledoit-Wolf), which
        keeps it invertible when there are fewer crops than feature dimensions.

        Raises
        ------
        ValueError
            If either set is empty or their dimensions differ.
        """
        from sklearn.covariance import LedoitWolf

        ref = np.asarray(reference, dtype=np.float64)
        held = np.asarray(heldout, dtype=np.float64)
        if ref.ndim != 2 or held.ndim != 2 or len(ref) < 2 or len(held) < 1 or ref.shape[1] != held.shape[1]:
            raise ValueError(f"reference [N, D] (N >= 2) and heldout [M, D] needed, got {ref.shape} and {held.shape}")
        lw = LedoitWolf().fit(ref)
        precision = np.linalg.pinv(lw.covariance_)
        dom = cls(lw.location_, precision, threshold=1.0, percentile=percentile)
        dom.threshold = float(np.percentile(dom.distance(held), percentile))
        if not dom.threshold > 0:
            raise ValueError("heldout: distances are all zero; cannot set a threshold")
        return dom

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance ``[N]`` of each feature row to the reference."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim == 1:
            f = f[None]
        d = f - self.mean[None]
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, self.precision, d), 0.0))

    def outside(self, features: np.ndarray) -> np.ndarray:
        """Boolean ``[N]``: which rows lie beyond the threshold."""
        return self.distance(features) > self.threshold

    def save(self, directory: str | Path) -> Path:
        """Write :data:`DOMAIN_FILE` into ``directory``; returns its path."""
        path = Path(directory) / DOMAIN_FILE
        save_file(
            {"mean": self.mean.astype(np.float32), "precision": self.precision.astype(np.float32)},
            str(path),
            metadata={"threshold": repr(float(self.threshold)), "percentile": repr(float(self.percentile)),
                      "features": self.features},
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureDomain:
        """Read a :data:`DOMAIN_FILE`.

        Raises
        ------
        PackageError
            If the file is missing or malformed.
        """
        from safetensors import safe_open

        p = Path(path)
        try:
            arrays = load_file(str(p))
            with safe_open(str(p), framework="np") as f:
                meta = f.metadata() or {}
            return cls(arrays["mean"], arrays["precision"], float(meta["threshold"]), float(meta.get("percentile", 99)),
                       meta.get("features", FEATURES_PENULTIMATE))
        except (OSError, KeyError, ValueError) as exc:
            raise PackageError(f"domain reference {p}: unreadable ({type(exc).__name__}: {exc})") from None


__all__ = ["DEFAULT_PERCENTILE", "DOMAIN_FILE", "FEATURES_PENULTIMATE", "FEATURES_POOLED", "FeatureDomain", "last_linear", "penultimate_features"]
