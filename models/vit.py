"""Paper A's Vision Transformer for lumbar disc level and herniation (``vit_ldh``).

Built on timm's :class:`~timm.models.vision_transformer.VisionTransformer`. The
default is the published configuration (patch 32, width 1536, depth 12, 12 heads,
MLP 2048, class-token pooling), about 194 M parameters with one input channel:
the training default for sites. ``small=True`` in :func:`models.registry.create_model`
gives a reduced configuration of the same architecture for the demo packages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.registry import Classifier, register_model


class VitLDH(Classifier):
    """ViT classifier with Grad-CAM hooks on its transformer blocks.

    Grad-CAM follows paper A: gradients of the class score with respect to the
    tokens entering a transformer block, patch tokens reshaped to their 2D grid.
    The block inputs (``norm1`` outputs) are used rather than block outputs
    because with class-token pooling the last block's patch-token outputs get no
    gradient. The multi-layer variant averages the normalised maps of
    ``cam_blocks`` (by default the last three blocks).

    Parameters
    ----------
    img_size : int
        Square input size in pixels; must be a multiple of ``patch_size``.
    patch_size, embed_dim, depth, num_heads, mlp_dim : int
        Transformer shape (paper A: 32, 1536, 12, 12, 2048).
    in_chans : int
        Input channels (1 for grey-level images).
    num_classes : int
        Output classes.
    drop_rate : float
        Dropout before the head.
    cam_blocks : sequence of int, optional
        Block indices combined by the multi-layer Grad-CAM (negative from the end).

    Raises
    ------
    ValueError
        If a size is not positive, ``img_size`` is not a multiple of ``patch_size``
        or ``embed_dim`` is not divisible by ``num_heads``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 32,
        embed_dim: int = 1536,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 2048,
        in_chans: int = 1,
        num_classes: int = 3,
        drop_rate: float = 0.0,
        cam_blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        for arg, val in {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim,
                         "depth": depth, "num_heads": num_heads, "mlp_dim": mlp_dim,
                         "in_chans": in_chans, "num_classes": num_classes}.items():
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{arg}: must be a positive int, got {val!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size: {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: {embed_dim} is not divisible by num_heads {num_heads}")
        self.net = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_dim / embed_dim,
            drop_rate=drop_rate,
        )
        self.grid = img_size // patch_size
        blocks = list(cam_blocks) if cam_blocks is not None else [-1, -2, -3]
        self.cam_blocks = sorted({b % depth for b in blocks})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def cam_target_layers(self, multilayer: bool = False) -> list[nn.Module]:
        idx = self.cam_blocks if multilayer else [len(self.net.blocks) - 1]
        return [self.net.blocks[i].norm1 for i in idx]

    def cam_reshape_transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        prefix = self.net.num_prefix_tokens
        grid = self.grid

        def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
            t = t[:, prefix:, :]
            return t.reshape(t.shape[0], grid, grid, t.shape[2]).permute(0, 3, 1, 2)

        return tokens_to_grid

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.net.fc_norm.parameters()) + list(self.net.head.parameters())


@register_model(
    small={"img_size": 128, "patch_size": 16, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_dim": 192},
    description="Paper A's ViT (patch 32, dim 1536, depth 12, heads 12, MLP 2048)",
)
def vit_ldh(**kwargs: object) -> VitLDH:
    """Paper A's ViT for disc level and herniation classification."""
    return VitLDH(**kwargs)  # type: ignore[arg-type]
