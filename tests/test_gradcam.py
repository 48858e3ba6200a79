"""Grad-CAM for every registered architecture: shape, not constant, and it follows the evidence.

Each model (small configuration) is trained for a few dozen steps to tell images
with a bright blob from images without; the class-"blob" heatmap must then
peak on the left when the blob is on the left and on the right when it is on
the right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.errors import ModelError
from models.gradcam import GradCamExplainer
from models.registry import create_model, list_models

torch.set_num_threads(1)
SIZE = 64


def blob_images(n: int, rng: np.random.Generator, col: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; label 1 ones (all when ``col`` is given) carry a bright blob."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    x = rng.normal(0, 0.3, (n, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 2, n) if col is None else np.ones(n, int)
    for i in np.flatnonzero(y):
        r = rng.uniform(12, SIZE - 12)
        c = col if col is not None else rng.uniform(10, SIZE - 10)
        x[i] += 2.0 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 3.0**2))
    return torch.from_numpy(x[:, None]), torch.from_numpy(y)


def trained(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    kw = {"img_size": SIZE, "patch_size": 16} if name == "vit_ldh" else {}
    model = create_model(name, small=True, num_classes=2, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4 if name == "vit_ldh" else 1e-3)
    model.train()
    ema = 1.0
    for _ in range(100):
        x, y = blob_images(8, rng)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema = 0.8 * ema + 0.2 * loss.item()
        if ema < 0.05:
            break
    return model.eval()


@pytest.fixture(scope="module", params=sorted(list_models()))
def model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, trained(request.param)


def peak_columns(maps: np.ndarray) -> np.ndarray:
    return np.array([np.unravel_index(int(np.argmax(m)), m.shape)[1] for m in maps])


def centroid_columns(maps: np.ndarray) -> np.ndarray:
    cols = np.arange(maps.shape[-1])
    return np.array([(m.sum(0) * cols).sum() / max(float(m.sum()), 1e-6) for m in maps])


@pytest.mark.parametrize("multilayer", [False, True])
def test_heatmap_follows_the_lesion(model: tuple[str, torch.nn.Module], multilayer: bool) -> None:
    name, net = model
    explainer = GradCamExplainer(net, multilayer=multilayer)
    left, _ = blob_images(6, np.random.default_rng(1), col=16)
    right, _ = blob_images(6, np.random.default_rng(1), col=48)
    h_left = explainer(left, [1] * 6)
    h_right = explainer(right, [1] * 6)
    assert h_left.shape == (6, SIZE, SIZE) and h_left.dtype == np.float32
    assert 0.0 <= h_left.min() and h_left.max() <= 1.0
    assert all(m.std() > 0.01 for m in h_left), f"{name}: constant heatmap"
    # the peak and the mass of the map move with the lesion
    assert np.median(peak_columns(h_left)) < SIZE / 2 <= np.median(peak_columns(h_right)), name
    assert centroid_columns(h_left).mean() + 8 < centroid_columns(h_right).mean(), name


def test_predicted_class_is_the_default_target(model: tuple[str, torch.nn.Module]) -> None:
    name, net = model
    x, _ = blob_images(4, np.random.default_rng(2), col=20)
    explainer = GradCamExplainer(net)
    np.testing.assert_allclose(explainer(x), explainer(x, net(x).argmax(1).tolist()), atol=1e-5)
    with pytest.raises(ModelError, match="targets"):
        explainer(x, [1])
    # hooks are released after each call: a later plain forward keeps no activations
    assert not any(m._forward_hooks for m in net.modules())
