"""The encoders' entry point: warm-up on a synthetic study, and the heatmap blend's shortcut."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.outputs import warm_up
from dicom_io.sc import _enlarge, blend_heatmap


def test_warm_up_encodes_sr_heatmap_and_key_image() -> None:
    assert warm_up() == 3
    assert warm_up() == 3  # and again: nothing is left behind that a second run trips over


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_blend_then_enlarge_equals_enlarge_then_blend(factor: int) -> None:
    rng = np.random.default_rng(factor)
    grey = rng.integers(0, 256, size=(7, 5), dtype=np.uint8)
    heat = rng.random((7, 5), dtype=np.float32)
    heat[0, 0], heat[1, 1] = 0.0, 1.0
    expected = blend_heatmap(_enlarge(grey, factor), _enlarge(heat, factor))
    got = _enlarge(blend_heatmap(grey, heat), factor)
    assert got.shape == (7 * factor, 5 * factor, 3)
    assert np.array_equal(got, expected)
    assert np.array_equal(_enlarge(grey, factor), np.kron(grey, np.ones((factor, factor), dtype=np.uint8)))
