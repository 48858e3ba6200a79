"""Training loop, strategies, resume, export with card and plots, evaluation and the CLI, on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.package import load_package, verify_package
from models.preprocess import Preprocessor
from models.registry import create_model
from training.augment import AUGMENTATIONS, Augmenter
from training.datasets import CropDataset, CropSet
from training.errors import CheckpointError, DataError
from training.loop import TrainSettings, fit
from training.trainer import evaluate_package, train_task

torch.set_num_threads(1)
PX = 32
NAMES = ["normal_mild", "moderate", "severe"]


def toy(n: int, seed: int) -> CropSet:
    """Class = size of a bright square (0: none, 1: small, 2: large), on noise; 2 crops per patient."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(100, 10, (n, PX, PX)).astype(np.float32)
    for i, c in enumerate(y):
        if c:
            h = 4 if c == 1 else 10
            r, col = rng.integers(4, PX - 14, 2)
            x[i, r:r + h, col:col + h] += 400
    return CropSet(x, y, np.array([f"p{seed}-{i // 2}" for i in range(n)]), NAMES, source="toy squares")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", small=True, num_classes=3)


def pre() -> Preprocessor:
    return Preprocessor({"mode": "percentile", "low": 0, "high": 100}, (PX, PX))


def settings(**kw: object) -> TrainSettings:
    base = dict(epochs=6, batch_size=16, lr=3e-3, patience=10, progress=False, seed=3)
    base.update(kw)
    return TrainSettings(**base)  # type: ignore[arg-type]


def test_fit_learns_and_resume_is_exact(tmp_path: Path) -> None:
    train, val = CropDataset(toy(90, 0), pre()), CropDataset(toy(30, 1), pre())
    model = small_model()
    full = fit(model, train, val, settings(), tmp_path / "a.pt")
    assert full.history["val_accuracy"][full.best_epoch - 1] > 0.8
    assert len(full.history["train_loss"]) == 6
    assert full.history["train_loss"][-1] < full.history["train_loss"][0]
    # interrupted after 3 epochs, then resumed: the same history as the uninterrupted run
    part = fit(small_model(), train, val, settings(epochs=3), tmp_path / "b.pt")
    assert len(part.history["train_loss"]) == 3
    resumed = fit(small_model(), train, val, settings(), tmp_path / "b.pt", resume=True)
    np.testing.assert_allclose(resumed.history["train_loss"], full.history["train_loss"], rtol=1e-4)
    with pytest.raises(CheckpointError, match="another run"):
        fit(small_model(), train, val, settings(seed=4), tmp_path / "b.pt", resume=True)


def test_early_stopping_and_plateau() -> None:
    train = CropDataset(toy(30, 0), pre())
    noise = toy(30, 5)
    noise.labels = np.random.default_rng(0).integers(0, 3, 30)  # unlearnable validation labels
    r = fit(small_model(), train, CropDataset(noise, pre()), settings(epochs=30, patience=2, plateau_patience=1))
    assert r.stopped_early and len(r.history["train_loss"]) < 30
    assert r.history["lr"][-1] < r.history["lr"][0] or len(r.history["lr"]) <= 3


def test_frozen_and_finetune_start_from_our_own_weights(tmp_path: Path) -> None:
    data = toy(60, 0)
    cfg, _ = train_task("mr_canal", data, tmp_path / "pkg", "resnet18", settings(epochs=2), small=True, folds=2,
                        model_kwargs={}, synthetic=True)
    _, base_cfg = load_package(tmp_path / "pkg")
    base = create_model("resnet18", **base_cfg.builder_kwargs())
    base.load_state_dict(load_package(tmp_path / "pkg")[0].state_dict())
    model = small_model()
    fit(model, CropDataset(data, pre()), None, settings(epochs=1, strategy="frozen", init=str(tmp_path / "pkg")))
    head = {n for n, _ in model.named_parameters() if n.startswith("net.fc")}
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        if n in head:
            assert not torch.equal(p, q), n
        else:
            assert torch.allclose(p, q, atol=1e-2), n  # fp16 storage rounding only
    tuned = small_model()
    fit(tuned, CropDataset(data, pre()), None, settings(epochs=1, strategy="finetune", init=str(tmp_path / "pkg")))
    assert not torch.allclose(tuned.net.conv1.weight, base.net.conv1.weight, atol=1e-2)
    with pytest.raises(ValueError, match="init"):
        TrainSettings(strategy="frozen")


def test_train_task_writes_a_complete_package(tmp_path: Path) -> None:
    out = tmp_path / "mr_canal"
    cfg, cv = train_task("mr_canal", toy(90, 0), out, "resnet18", settings(epochs=4), small=True, folds=3,
                         holdout=toy(30, 9), synthetic=True, version="9.9.9")
    assert len(cv.folds) == 3 and set(cv.summary["accuracy"]) == {"mean", "sd", "n_folds"}
    assert verify_package(out).sha256 == cfg.sha256
    assert cfg.metrics["source"] == "held-out set" and cfg.metrics["accuracy"] > 0.6
    assert cfg.preprocessing["crop_px"] == PX and cfg.class_names == NAMES
    for f in ("MODEL_CARD.md", "model_card.json", "training_curves.png", "cv_confusion.png", "cv_roc.png",
              "holdout_confusion.png", "holdout_roc.png"):
        assert (out / f).stat().st_size > 0, f
    card = (out / "MODEL_CARD.md").read_text()
    assert card.splitlines()[2].startswith("**Provenance:** [SYNTHETIC ONLY]")  # the card opens with it
    assert cfg.synthetic_only and cfg.provenance_record.validation["method"] == "held-out"
    cal = cfg.calibration
    assert cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"] + 1e-9  # fitted on the same logits
    assert "synthetic phantom data only" in card and "Not for clinical use" in card
    assert "reduced configuration" in card
    js = json.loads((out / "model_card.json").read_text())
    assert js["evaluation"]["holdout"]["n"] == 30
    report = evaluate_package(out, toy(30, 9), tmp_path / "eval")
    assert report["metrics"]["accuracy"] == pytest.approx(cfg.metrics["accuracy"])
    assert (tmp_path / "eval" / "evaluation.json").is_file()
    with pytest.raises(DataError, match="classes"):
        train_task("xray", toy(30, 0), tmp_path / "x", "resnet18", settings(epochs=1), small=True, folds=2)


def test_augmentations_keep_shape_and_range() -> None:
    x = torch.rand(8, 1, PX, PX)
    g = torch.Generator().manual_seed(0)
    for name, aug in AUGMENTATIONS.items():
        y = aug(x, g)
        assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1, name
    assert torch.equal(AUGMENTATIONS["none"](x), x)
    flip = Augmenter(hflip=1.0)(x)
    assert torch.allclose(flip, x.flip(-1), atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        Augmenter(scale=(1.2, 0.8))


def test_cli_train_and_evaluate(tmp_path: Path) -> None:
    from training.cli import evaluate_app, train_app

    toy(60, 0).save(tmp_path / "train.npz")
    toy(30, 1).save(tmp_path / "held.npz")
    runner = CliRunner()
    res = runner.invoke(train_app, ["mr_foramen", "--source", "manifest", "--data", str(tmp_path / "train.npz"),
                                    "--holdout", str(tmp_path / "held.npz"), "--arch", "resnet18", "--small",
                                    "--folds", "2", "--epochs", "2", "--out", str(tmp_path / "pkg"),
                                    "--model-kwargs", '{"output_stride": 8}', "--multilayer-cam"])
    assert res.exit_code == 0, res.output
    cfg = verify_package(tmp_path / "pkg")
    assert cfg.task == "mr_foramen"
    # builder arguments and the Grad-CAM choice travel with the weights
    assert cfg.model_kwargs["output_stride"] == 8 and cfg.explain == {"multilayer": True}
    res = runner.invoke(train_app, ["mr_foramen", "--model-kwargs", "{output_stride: 8}"])
    assert res.exit_code != 0 and "--model-kwargs" in res.output
    res = runner.invoke(evaluate_app, ["mr_foramen", "--package", str(tmp_path / "pkg"), "--source", "manifest",
                                       "--data", str(tmp_path / "held.npz"), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["metrics"]["n"] == 30
    res = runner.invoke(train_app, ["mr_foramen", "--source", "rsna"])
    assert res.exit_code != 0 and "--data" in res.output
