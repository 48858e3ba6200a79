"""The papers' CNN baselines through timm: ResNet18, ResNet50, VGG16, DenseNet201.

Always built with random weights (``pretrained=False``): no hub weights exist on
the machines this runs on, so "fine-tuning" starts from a checkpoint of our own.
Grad-CAM looks at the last convolutional stage, as paper C does; the multi-layer
variant averages it with the stages before it (for a ResNet the last block of
layers 2, 3 and 4, which share one grid when the network is built with
``output_stride=8``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models.vgg import VGG, cfgs
from torch import nn

from models.registry import Classifier, register_model


class TimmClassifier(Classifier):
    """A timm CNN with the registry's Grad-CAM and head hooks.

    Parameters
    ----------
    arch : str
        timm architecture name.
    cam_layers : callable
        ``(net, multilayer) -> list of modules`` for Grad-CAM.
    head : callable
        ``net -> module`` holding the classification head.
    in_chans, num_classes : int
        Input channels and output classes.
    net_class : callable, optional
        Build the network with this timm class instead of :func:`timm.create_model`.
    **timm_kwargs
        Passed to :func:`timm.create_model` (or ``net_class``).

    Raises
    ------
    ValueError
        If ``in_chans`` or ``num_classes`` is not a positive int.
    """

    def __init__(
        self,
        arch: str,
        cam_layers: Callable[[nn.Module, bool], list[nn.Module]],
        head: Callable[[nn.Module], nn.Module],
        in_chans: int = 1,
        num_classes: int = 3,
        net_class: Callable[..., nn.Module] | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        for arg, val in {"in_chans": in_chans, "num_classes": num_classes}.items():
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{arg}: must be a positive int, got {val!r}")
        if net_class is not None:
            self.net = net_class(in_chans=in_chans, num_classes=num_classes, **timm_kwargs)
        else:
            self.net = timm.create_model(
                arch, pretrained=False, in_chans=in_chans, num_classes=num_classes, **timm_kwargs
            )
        self._cam_layers = cam_layers
        self._head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def cam_target_layers(self, multilayer: bool = False) -> list[nn.Module]:
        return self._cam_layers(self.net, multilayer)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self._head(self.net).parameters())


def _resnet_cam(net: nn.Module, multilayer: bool) -> list[nn.Module]:
    return [net.layer2[-1], net.layer3[-1], net.layer4[-1]] if multilayer else [net.layer4[-1]]


#: Reduced widths of the same topology, for tests and quick experiments.
_SMALL_RESNET = {"channels": (16, 32, 64, 128), "stem_width": 16}


@register_model(small=_SMALL_RESNET, description="ResNet18 (timm, random init)")
def resnet18(**kwargs: Any) -> TimmClassifier:
    """ResNet18 baseline (papers A and C)."""
    return TimmClassifier("resnet18", _resnet_cam, lambda n: n.fc, **kwargs)


@register_model(small=_SMALL_RESNET, description="ResNet50 (timm, random init)")
def resnet50(**kwargs: Any) -> TimmClassifier:
    """ResNet50 baseline (papers A, B and C)."""
    return TimmClassifier("resnet50", _resnet_cam, lambda n: n.fc, **kwargs)


def _vgg_cam(net: nn.Module, multilayer: bool) -> list[nn.Module]:
    # features[-1] is the last max-pool; the ReLU before it closes the last conv stage
    last = net.features[-2]
    return [net.features[-9], last] if multilayer else [last]


@register_model(
    small={"width": 0.25, "mlp_ratio": 0.125},
    description="VGG16 (timm, random init; width scales the 13 convolutions)",
)
def vgg16(width: float = 1.0, **kwargs: Any) -> TimmClassifier:
    """VGG16 baseline (papers A, B and C); ``width`` scales the convolution channels."""
    if not width > 0:
        raise ValueError(f"width: must be > 0, got {width!r}")
    head = lambda n: nn.ModuleList([n.pre_logits, n.head])  # noqa: E731
    if width == 1.0:
        return TimmClassifier("vgg16", _vgg_cam, head, **kwargs)
    cfg = [c if c == "M" else max(8, int(round(c * width))) for c in cfgs["vgg16"]]
    return TimmClassifier("vgg16", _vgg_cam, head, net_class=VGG, cfg=cfg, **kwargs)


def _densenet_cam(net: nn.Module, multilayer: bool) -> list[nn.Module]:
    f = net.features
    return [f.transition3, f.norm5] if multilayer else [f.norm5]


@register_model(small={"growth_rate": 8}, description="DenseNet201 (timm, random init)")
def densenet201(**kwargs: Any) -> TimmClassifier:
    """DenseNet201 baseline (paper B)."""
    return TimmClassifier("densenet201", _densenet_cam, lambda n: n.classifier, **kwargs)
