"""Paper B's CNN with multiple attention mechanisms for lumbar spinal stenosis (``attention_cnn_lss``).

Head, body and tail follow the paper's description; where it leaves a choice
open, the choice made here is written in :class:`AttentionCNN`'s docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import Classifier, register_model


def _ch(base: int, width: float) -> int:
    """Channels scaled by the width multiplier, kept a multiple of 8 (heads and groups divide it)."""
    return max(8, int(round(base * width / 8.0)) * 8)


class ConvBNReLU(nn.Sequential):
    """Convolution, batch normalisation, ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SeparableConv(nn.Sequential):
    """Depthwise-separable convolution: depthwise ``k x k`` then pointwise 1x1, each with BN+ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(ConvBNReLU(cin, cin, k, stride, groups=cin), ConvBNReLU(cin, cout, 1))


class EnhancedInception(nn.Module):
    """Enhanced Inception Module: parallel 1x1, separable 3x3, 5x5, 7x7 and pooled 1x1 branches.

    Branch outputs are concatenated and fused by a 1x1 convolution, with a 1x1
    residual projection of the input.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        b = cout // 4
        self.b1 = ConvBNReLU(cin, b, 1)
        self.b3 = nn.Sequential(ConvBNReLU(cin, b, 1), SeparableConv(b, b, 3))
        self.b5 = nn.Sequential(ConvBNReLU(cin, b, 1), SeparableConv(b, b, 5))
        self.b7 = nn.Sequential(ConvBNReLU(cin, b, 1), SeparableConv(b, b, 7))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBNReLU(cin, b, 1))
        self.fuse = nn.Sequential(nn.Conv2d(5 * b, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.b7(x), self.bp(x)], dim=1)
        return F.relu(self.fuse(y) + self.proj(x))


class CBAM(nn.Module):
    """Convolutional block attention: channel attention (GAP and GMP through a shared MLP),
    then spatial attention (channel mean and max through a 7x7 convolution)."""

    def __init__(self, channels: int, reduction: int = 8, kernel: int = 7) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ca = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))
        x = x * ca[:, :, None, None]
        sa = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
        return x * sa


class TokenSelfAttention(nn.Module):
    """Multi-head self-attention over the ``H x W`` tokens of a feature map.

    Position enters through a depthwise 3x3 convolution added to the map before
    tokenisation (a conditional positional encoding), so any input size works.
    Pre-norm attention and MLP, both residual.
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.pos = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = (x + self.pos(x)).flatten(2).transpose(1, 2)  # [N, HW, C]
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.mlp(self.norm2(t))


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020): slots compete for tokens, refined iteratively.

    Softmax over slots, weighted mean of values, GRU update, then a residual MLP
    with LayerNorm. Slots start from learned per-slot embeddings instead of
    random samples, so predictions are deterministic at inference.
    """

    def __init__(self, channels: int, num_slots: int, iters: int) -> None:
        super().__init__()
        self.iters = iters
        self.scale = channels ** -0.5
        self.slots = nn.Parameter(torch.randn(1, num_slots, channels) * channels ** -0.5)
        self.norm_in = nn.LayerNorm(channels)
        self.norm_slots = nn.LayerNorm(channels)
        self.norm_mlp = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels, bias=False)
        self.k = nn.Linear(channels, channels, bias=False)
        self.v = nn.Linear(channels, channels, bias=False)
        self.gru = nn.GRUCell(channels, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.ReLU(inplace=True), nn.Linear(2 * channels, channels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, _, c = tokens.shape
        x = self.norm_in(tokens)
        k, v = self.k(x), self.v(x)
        slots = self.slots.expand(n, -1, -1)
        for _ in range(self.iters):
            prev = slots
            q = self.q(self.norm_slots(slots))
            attn = torch.softmax(torch.einsum("nkc,ntc->nkt", q, k) * self.scale, dim=1) + 1e-8
            attn = attn / attn.sum(dim=-1, keepdim=True)
            updates = torch.einsum("nkt,ntc->nkc", attn, v)
            slots = self.gru(updates.reshape(-1, c), prev.reshape(-1, c)).reshape(n, -1, c)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots  # [N, K, C]


class AttentionCNN(Classifier):
    """Paper B's CNN with multiple attention mechanisms.

    Head: 7x7 conv + BN + ReLU (stride 2), repeated once at stride 1, 3x3 max-pool,
    then an Enhanced Inception Module with depthwise-separable 3x3/5x5/7x7
    branches. Body: three parallel branches on the same feature map: CBAM, multi-head
    self-attention over the ``H x W`` tokens and slot attention; each branch is
    reduced by global average pooling (over positions for CBAM and self-attention,
    over slots for slot attention) and the three vectors are concatenated. Tail:
    FC, LayerNorm, GELU, Dropout 0.5, FC.

    Choices where the paper is vague: two stride-2 depthwise-separable
    convolutions follow the inception module so that the body sees a 1/16
    resolution map (14 x 14 tokens at 224 px), which keeps self-attention
    affordable; positions enter the self-attention through a depthwise
    convolution; slots start from learned embeddings (deterministic); Grad-CAM
    uses the CBAM output, the body's convolutional branch: the 1/16 feature map
    after channel and spatial attention. The self-attention and slot branches mix
    positions globally, and on the feature map before them Grad-CAM was measured
    not to follow a moved lesion, while on the CBAM output it does.

    Parameters
    ----------
    in_chans : int
        Input channels.
    num_classes : int
        Output classes.
    width : float
        Channel multiplier (1.0: 32/64/128/256 channels in the successive stages).
    heads : int
        Self-attention heads.
    num_slots, slot_iters : int
        Slot attention's number of slots and refinement iterations.
    drop_rate : float
        Dropout in the tail (paper: 0.5).

    Raises
    ------
    ValueError
        If a count is not positive, ``width`` is not positive or ``drop_rate`` is outside [0, 1).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 3,
        width: float = 1.0,
        heads: int = 8,
        num_slots: int = 4,
        slot_iters: int = 3,
        drop_rate: float = 0.5,
    ) -> None:
        super().__init__()
        for arg, val in {"in_chans": in_chans, "num_classes": num_classes, "heads": heads,
                         "num_slots": num_slots, "slot_iters": slot_iters}.items():
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{arg}: must be a positive int, got {val!r}")
        if not width > 0:
            raise ValueError(f"width: must be > 0, got {width!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate: must be in [0, 1), got {drop_rate!r}")
        c1, c2, c3, c4 = (_ch(b, width) for b in (32, 64, 128, 256))
        if c4 % heads:
            raise ValueError(f"heads: {heads} does not divide the body width {c4}")
        self.head = nn.Sequential(
            ConvBNReLU(in_chans, c1, 7, 2),
            ConvBNReLU(c1, c1, 7, 1),
            nn.MaxPool2d(3, 2, 1),
            EnhancedInception(c1, c2),
        )
        self.features = nn.Sequential(SeparableConv(c2, c3, 3, 2), SeparableConv(c3, c4, 3, 2))
        self.cbam = CBAM(c4)
        self.mhsa = TokenSelfAttention(c4, heads)
        self.slot = SlotAttention(c4, num_slots, slot_iters)
        hidden = _ch(256, width)
        self.tail = nn.Sequential(
            nn.Linear(3 * c4, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(drop_rate),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(self.head(x))
        a = self.cbam(f).mean(dim=(2, 3))
        tokens = self.mhsa(f)
        b = tokens.mean(dim=1)
        s = self.slot(f.flatten(2).transpose(1, 2)).mean(dim=1)
        return self.tail(torch.cat([a, b, s], dim=1))

    def cam_target_layers(self, multilayer: bool = False) -> list[nn.Module]:
        # one spatially faithful map only (see the class docstring), with or without multilayer
        return [self.cbam]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.tail.parameters())


@register_model(
    small={"width": 0.5, "heads": 4},
    description="Paper B's CNN with CBAM, self-attention and slot attention",
)
def attention_cnn_lss(**kwargs: object) -> AttentionCNN:
    """Paper B's CNN with multiple attention mechanisms for spinal stenosis."""
    return AttentionCNN(**kwargs)  # type: ignore[arg-type]
