"""The papers' augmentations, batched on tensors in [0, 1] (between resize and standardisation).

- paper A (CT axial, ViT): rotation within +-5 degrees only;
- paper B (MR stenosis): scale 0.8-1.2, translation +-20 px at 224 px (+-9 %),
  rotation +-15 degrees, vertical flip;
- paper C (X-ray): horizontal flip, rotation +-15 degrees, translation +-10 %,
  scale 0.8-1.2, shear +-10 degrees, brightness/contrast jitter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from training.errors import TrainingError


@dataclass(frozen=True)
class Augmenter:
    """Random affine transform, flips and intensity jitter for a batch ``[N, 1, H, W]`` in [0, 1].

    Parameters
    ----------
    rotate_deg : float
        Rotation drawn uniformly in +-``rotate_deg``.
    scale : tuple of float
        Zoom factor range.
    translate : float
        Shift as a fraction of the image size, uniformly in +-``translate``.
    shear_deg : float
        Horizontal shear in +-``shear_deg``.
    hflip, vflip : float
        Probability of a left-right / up-down flip.
    brightness, contrast : float
        Additive brightness in +-``brightness``; contrast factor in 1 +- ``contrast``.

    Raises
    ------
    ValueError
        If a range or probability is invalid.
    """

    rotate_deg: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    shear_deg: float = 0.0
    hflip: float = 0.0
    vflip: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale: need 0 < low <= high, got {self.scale!r}")
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: probability must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("rotate_deg", "translate", "shear_deg", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:
            return x

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) * (hi - lo) + lo

        ang = u(-self.rotate_deg, self.rotate_deg) * math.pi / 180
        sh = u(-self.shear_deg, self.shear_deg) * math.pi / 180
        s = u(*self.scale)
        tx, ty = u(-self.translate, self.translate) * 2, u(-self.translate, self.translate) * 2
        fx = torch.where(torch.rand(n, generator=generator) < self.hflip, -1.0, 1.0)
        fy = torch.where(torch.rand(n, generator=generator) < self.vflip, -1.0, 1.0)
        cos, sin, tan = torch.cos(ang), torch.sin(ang), torch.tan(sh)
        # output->input sampling matrix: flip, then inverse zoom of rotation and shear
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = fx * (cos + tan * sin) / s
        theta[:, 0, 1] = fy * (-sin + tan * cos) / s
        theta[:, 1, 0] = fx * sin / s
        theta[:, 1, 1] = fy * cos / s
        theta[:, 0, 2] = tx
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.contrast or self.brightness:
            c = u(1 - self.contrast, 1 + self.contrast).to(x)[:, None, None, None]
            b = u(-self.brightness, self.brightness).to(x)[:, None, None, None]
            out = (out - 0.5) * c + 0.5 + b
        return out.clamp(0.0, 1.0)


#: Named augmentation sets from the papers, plus none.
AUGMENTATIONS: dict[str, Augmenter] = {
    "none": Augmenter(),
    "paper_a": Augmenter(rotate_deg=5.0),
    "paper_b": Augmenter(rotate_deg=15.0, scale=(0.8, 1.2), translate=20 / 224, vflip=0.5),
    "paper_c": Augmenter(rotate_deg=15.0, scale=(0.8, 1.2), translate=0.10, shear_deg=10.0, hflip=0.5,
                         brightness=0.1, contrast=0.2),
}

#: Default augmentation per task (the paper each task follows).
TASK_AUGMENTATION: dict[str, str] = {
    "mr_disc": "paper_a", "ct_disc": "paper_a", "ct_level": "paper_a",
    "mr_canal": "paper_b", "mr_foramen": "paper_b", "mr_subarticular": "paper_b",
    "xray": "paper_c",
}


def augmentation(name: str) -> Augmenter:
    """The named augmentation set.

    Raises
    ------
    TrainingError
        If the name is unknown (the message lists the known ones).
    """
    if name not in AUGMENTATIONS:
        raise TrainingError(f"augmentation: unknown {name!r}; known: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
