"""Load a model package once, then classify and explain batches of raw crops.

The pipeline's one entry point to the networks: preprocessing comes from the
package's configuration, batches are split to bound memory, inference runs in
eval mode without gradients (autocast on CUDA), and Grad-CAM heatmaps come back
in the pixels of the crops given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.domain import FeatureDomain, penultimate_features
from models.errors import ModelError, PreprocessError
from models.gradcam import GradCamExplainer
from models.package import load_package
from models.preprocess import Preprocessor
from models.registry import Classifier


class Predictor:
    """A loaded model with its preprocessing.

    Parameters
    ----------
    model : Classifier
        Network in eval mode.
    config : ModelConfig
        Its configuration.
    device : str or torch.device, optional
        Where to run; CUDA when available, else CPU.
    batch_size : int
        Largest batch sent through the network at once.
    domain : FeatureDomain, optional
        Reference of the package's validated inputs; without it :meth:`assess`
        reports no distances.

    Raises
    ------
    TypeError
        If ``model`` or ``config`` has the wrong type.
    ValueError
        If ``batch_size`` is not positive.
    """

    def __init__(
        self,
        model: Classifier,
        config: ModelConfig,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        domain: FeatureDomain | None = None,
    ) -> None:
        if not isinstance(model, Classifier):
            raise TypeError(f"model: must be a registered Classifier, got {type(model).__name__}")
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: must be a ModelConfig, got {type(config).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.float().eval().to(self.device)
        self.config = config
        self.batch_size = batch_size
        self.preprocess = Preprocessor.from_config(config)
        multilayer = config.explain.get("multilayer", config.architecture == "vit_ldh")
        self.explainer = GradCamExplainer(self.model, multilayer=bool(multilayer))
        self.temperature = config.temperature
        self.domain = domain

    @classmethod
    def from_package(cls, path: str | Path, device: str | torch.device | None = None, batch_size: int = 32) -> Predictor:
        """Load and verify the package at ``path`` (see :func:`models.package.load_package`).

        Raises
        ------
        PackageError
            If the package is incomplete, its hash does not match, or its weights do not fit.
        """
        model, cfg = load_package(path)
        domain = FeatureDomain.load(Path(path) / str(cfg.domain_check["file"])) if cfg.domain_check else None
        return cls(model, cfg, device=device, batch_size=batch_size, domain=domain)  # type: ignore[arg-type]

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    def _chunks(self, batch: np.ndarray) -> list[np.ndarray]:
        a = np.asarray(batch, dtype=np.float32)
        if a.ndim != 3 or a.shape[0] == 0:
            raise PreprocessError(f"batch: expected [N, H, W] crops with N >= 1, got shape {a.shape}")
        return [a[i:i + self.batch_size] for i in range(0, a.shape[0], self.batch_size)]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities ``[N, C]`` (float32, rows sum to 1) for raw crops ``[N, H, W]``.

        The logits are divided by the package's calibration temperature (1 when
        it has none) before the softmax.

        Raises
        ------
        PreprocessError
            If the batch is not ``[N, H, W]`` or holds non-finite values.
        """
        return self.assess(batch)[0]

    def assess(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(probabilities [N, C], domain distances [N] or None)`` in one forward pass.

        The distances are the Mahalanobis distances of the crops' penultimate
        features to the package's validated inputs (:class:`models.domain.FeatureDomain`);
        None when the package carries no reference.

        Raises
        ------
        PreprocessError
            If the batch is not ``[N, H, W]`` or holds non-finite values.
        """
        out, dist = [], []
        with torch.inference_mode():
            for chunk in self._chunks(batch):
                x = self.preprocess(chunk).to(self.device)
                with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                    if self.domain is not None:
                        feats, logits = penultimate_features(self.model, x, self.domain.pooled)
                        dist.append(self.domain.distance(feats.float().cpu().numpy()))
                    else:
                        logits = self.model(x)
                out.append(torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy())
        probs = np.concatenate(out).astype(np.float32)
        return probs, (np.concatenate(dist) if dist else None)

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Penultimate-layer features ``[N, D]`` of raw crops (the input of the last linear layer).

        Raises
        ------
        PreprocessError
            If the batch is malformed.
        """
        out = []
        with torch.inference_mode():
            for chunk in self._chunks(batch):
                pooled = self.domain.pooled if self.domain is not None else True
                feats, _ = penultimate_features(self.model, self.preprocess(chunk).to(self.device), pooled)
                out.append(feats.float().cpu().numpy())
        return np.concatenate(out)

    def explain(self, batch: np.ndarray, target: Sequence[int] | None = None) -> np.ndarray:
        """Grad-CAM heatmaps ``[N, H, W]`` in [0, 1], in the pixels of the crops given.

        Parameters
        ----------
        batch : np.ndarray
            Raw crops ``[N, H, W]``.
        target : sequence of int, optional
            Class to explain per crop; the predicted class when None.

        Raises
        ------
        PreprocessError
            If the batch is malformed.
        ModelError
            If ``target`` has the wrong length or a class index out of range.
        """
        chunks = self._chunks(batch)
        n = sum(len(c) for c in chunks)
        if target is not None:
            target = [int(t) for t in target]
            if len(target) != n:
                raise ModelError(f"target: need one class per crop ({n}), got {len(target)}")
            if any(not 0 <= t < self.config.num_classes for t in target):
                raise ModelError(f"target: class indices must be in [0, {self.config.num_classes}), got {target}")
        h, w = np.asarray(batch).shape[1:]
        maps = []
        start = 0
        for chunk in chunks:
            x = self.preprocess(chunk).to(self.device)
            tgt = None if target is None else target[start:start + len(chunk)]
            start += len(chunk)
            heat = torch.from_numpy(self.explainer(x, tgt))[:, None]
            if tuple(heat.shape[-2:]) != (h, w):
                heat = F.interpolate(heat, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(heat[:, 0].clamp_(0.0, 1.0).numpy())
        return np.concatenate(maps).astype(np.float32)
