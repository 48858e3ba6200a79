"""Grad-CAM for every registered architecture, through pytorch-grad-cam.

CNNs use their last convolutional stage; the ViT reshapes its patch tokens to
the 2D grid; ``multilayer=True`` averages the normalised maps of several layers
(paper A's multi-layer variant for the ViT). Heatmaps come back at the network
input size, normalised to [0, 1] per image.

Grad-CAM keeps only channels whose pooled gradient is positive; when a class
is predicted from the absence of something (a canal narrowed to nothing), every
location can come out negative and the map is empty. For those images the
element-wise variant (LayerCAM: positive gradients times activations, per
location) is computed on the same layers instead, so that every finding has a
map to show.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from models.errors import ModelError
from models.registry import Classifier


class GradCamExplainer:
    """Class-specific Grad-CAM heatmaps for one model.

    Parameters
    ----------
    model : Classifier
        A registered architecture.
    multilayer : bool
        Combine several layers (see :meth:`Classifier.cam_target_layers`).

    Raises
    ------
    TypeError
        If ``model`` is not a :class:`~models.registry.Classifier`.
    """

    def __init__(self, model: Classifier, multilayer: bool = False) -> None:
        if not isinstance(model, Classifier):
            raise TypeError(f"model: must be a registered Classifier, got {type(model).__name__}")
        self.model = model
        self.multilayer = bool(multilayer)

    def __call__(self, x: torch.Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
        """Heatmaps ``[N, h, w]`` float32 in [0, 1] for network input ``x`` ``[N, C, h, w]``.

        Parameters
        ----------
        x : torch.Tensor
            Preprocessed network input on the model's device.
        targets : sequence of int, optional
            Class per image; the predicted class when None.

        Raises
        ------
        ModelError
            If ``targets`` does not give one valid class per image.
        """
        if targets is not None:
            targets = [int(t) for t in targets]
            if len(targets) != x.shape[0]:
                raise ModelError(f"targets: need one class per image ({x.shape[0]}), got {len(targets)}")
            if any(t < 0 for t in targets):
                raise ModelError(f"targets: class indices must be >= 0, got {targets}")
        heat = self._run(GradCAM, x, targets)
        empty = heat.reshape(len(heat), -1).max(axis=1) <= 0
        if empty.any():
            idx = np.flatnonzero(empty)
            sub = None if targets is None else [targets[i] for i in idx]
            heat[idx] = self._run(LayerCAM, x[torch.as_tensor(idx)], sub)
        return heat

    def _run(self, method: type, x: torch.Tensor, targets: Sequence[int] | None) -> np.ndarray:
        layers = self.model.cam_target_layers(self.multilayer)
        was_training = self.model.training
        # hooks live only for this call, so plain predictions pay nothing for them
        cam = method(model=self.model, target_layers=layers, reshape_transform=self.model.cam_reshape_transform())
        try:
            with torch.enable_grad():
                outputs = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
                heat = cam(input_tensor=x, targets=outputs)
        finally:
            cam.activations_and_grads.release()
            self.model.train(was_training)
        return np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
