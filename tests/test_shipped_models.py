"""The shipped classifier packages: valid, small, honestly labelled, and as accurate as their cards say.

Each package is run on freshly generated synthetic studies (seeds used neither
for training nor for the card's held-out set) and must reach its card's
held-out accuracy within a margin that allows for the small sample.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.package import SHIPPED_DIR, installed_packages
from models.predictor import Predictor
from training.synthetic import synthetic_crops
from training.tasks import TASKS

pytestmark = pytest.mark.slow  # renders fresh phantom studies and scores every shipped package

torch.set_num_threads(1)
FRESH_SEEDS = range(200_000, 200_008)
#: Package of a synthetic training task where it ships under another task: the synthetic X-ray
#: classifier serves lateral views only; AP views use a package trained on real radiographs
#: (tests/test_xray_real.py).
PACKAGE_TASK = {"xray": "xray_spondylolisthesis"}
_INSTALLED = {c.task: c for c in installed_packages([SHIPPED_DIR])}
SHIPPED = {t: _INSTALLED[PACKAGE_TASK.get(t, t)] for t in TASKS if PACKAGE_TASK.get(t, t) in _INSTALLED}


def test_every_task_is_shipped() -> None:
    missing = sorted(set(TASKS) - set(SHIPPED))
    assert not missing, f"no shipped package for {missing}"


def test_packages_are_small_and_labelled() -> None:
    total = sum(f.stat().st_size for f in SHIPPED_DIR.rglob("*") if f.is_file())
    assert total < 60 * 2**20, f"shipped packages take {total / 2**20:.1f} MiB"
    for task, cfg in SHIPPED.items():
        card = (SHIPPED_DIR / PACKAGE_TASK.get(task, task) / "MODEL_CARD.md").read_text()
        assert "synthetic phantom data only" in card and "Not for clinical use" in card, task
        assert cfg.training.get("synthetic") is True
        assert cfg.metrics.get("source") == "held-out set"
        assert cfg.class_names == list(TASKS[task].class_names)


@pytest.fixture(scope="module")
def fresh() -> dict:
    return synthetic_crops([t for t in TASKS if t in SHIPPED], FRESH_SEEDS,
                           crop_px={t: int(c.preprocessing["crop_px"]) for t, c in SHIPPED.items()})


@pytest.mark.parametrize("task", sorted(TASKS))
def test_accuracy_on_fresh_synthetic_studies(task: str, fresh: dict) -> None:
    if task not in SHIPPED:
        pytest.skip(f"{task} is not shipped")
    cfg = SHIPPED[task]
    data = fresh[task]
    pred = Predictor.from_package(SHIPPED_DIR / PACKAGE_TASK.get(task, task), device="cpu")
    probs = pred.predict(data.images)
    acc = float((probs.argmax(1) == data.labels).mean())
    card = float(cfg.metrics["accuracy"])
    # three binomial standard errors at this sample size, plus 5 points
    margin = 3 * math.sqrt(max(card * (1 - card), 0.02) / len(data)) + 0.05
    assert acc >= card - margin, f"{task}: {acc:.3f} on {len(data)} fresh crops, card says {card:.3f}"
    heat = pred.explain(data.images[:2])
    assert heat.shape == (2, *data.images.shape[1:]) and np.all(heat.max(axis=(1, 2)) > 0)
