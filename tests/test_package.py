"""Model packages: write, verify, refuse tampered or incomplete ones; the predictor on top."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.errors import ModelError, PackageError, PreprocessError
from models.package import find_package, installed_packages, load_package, save_package, verify_package
from models.predictor import Predictor
from models.preprocess import Preprocessor
from models.registry import create_model

torch.set_num_threads(1)


def make_config(**over: object) -> ModelConfig:
    base = dict(
        name="discus-test-disc", architecture="attention_cnn_lss", task="mr_disc", version="0.1.0",
        input_size=(64, 64), in_chans=1, class_names=["normal", "bulging", "herniation"],
        preprocessing={"mode": "percentile", "low": 1.0, "high": 99.0, "crop_px": 48},
        model_kwargs={"width": 0.5, "heads": 4}, training={"data": "unit test"}, metrics={"accuracy": 0.5},
    )
    base.update(over)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.fixture()
def package(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = make_config()
    model = create_model(cfg.architecture, **cfg.builder_kwargs()).eval()
    save_package(model, cfg, tmp_path / "mr_disc")
    return tmp_path / "mr_disc", model


def test_round_trip(package: tuple[Path, torch.nn.Module]) -> None:
    path, model = package
    data = json.loads((path / "config.json").read_text())
    assert len(data["sha256"]) == 64
    loaded, cfg = load_package(path)
    assert cfg.task == "mr_disc" and cfg.class_names == ["normal", "bulging", "herniation"]
    assert not loaded.training
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        # fp16 storage costs only rounding
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=5e-2)
    assert [c.name for c in installed_packages([path.parent])] == ["discus-test-disc"]
    assert find_package("mr_disc", [path.parent]) == path


def test_tampered_weights_are_refused(package: tuple[Path, torch.nn.Module]) -> None:
    path, _ = package
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="sha256"):
        load_package(path)
    assert installed_packages([path.parent]) == []
    with pytest.raises(PackageError, match="refused"):
        find_package("mr_disc", [path.parent])


def test_incomplete_config_is_refused(package: tuple[Path, torch.nn.Module]) -> None:
    path, _ = package
    data = json.loads((path / "config.json").read_text())
    del data["class_names"]
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="class_names"):
        verify_package(path)


def test_missing_weights_and_unknown_architecture(tmp_path: Path, package: tuple[Path, torch.nn.Module]) -> None:
    path, _ = package
    data = json.loads((path / "config.json").read_text())
    data["architecture"] = "no_such_net"
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="unknown architecture 'no_such_net'"):
        load_package(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(PackageError, match="missing"):
        load_package(path)
    with pytest.raises(PackageError, match="not a directory"):
        load_package(tmp_path / "nowhere")


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    cfg = make_config()
    model = create_model(cfg.architecture, **cfg.builder_kwargs())
    saved = save_package(model, cfg, tmp_path / "p")
    data = saved.to_dict()
    data["model_kwargs"] = {"width": 1.0}
    (tmp_path / "p" / "config.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="do not fit"):
        load_package(tmp_path / "p")


def test_predictor(package: tuple[Path, torch.nn.Module]) -> None:
    path, _ = package
    pred = Predictor.from_package(path, device="cpu", batch_size=4)
    rng = np.random.default_rng(0)
    crops = (rng.random((6, 48, 48)) * 800).astype(np.float32)
    probs = pred.predict(crops)
    assert probs.shape == (6, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # batching does not change results
    np.testing.assert_allclose(pred.predict(crops[:2]), probs[:2], atol=1e-5)
    maps = pred.explain(crops, [0, 1, 2, 0, 1, 2])
    assert maps.shape == (6, 48, 48) and maps.min() >= 0 and maps.max() <= 1
    assert pred.explain(crops[:2]).shape == (2, 48, 48)
    with pytest.raises(ModelError, match="target"):
        pred.explain(crops, [0])
    with pytest.raises(ModelError, match="target"):
        pred.explain(crops[:1], [3])
    with pytest.raises(PreprocessError, match="batch"):
        pred.predict(np.zeros((48, 48, 2, 2), np.float32))
    with pytest.raises(PreprocessError, match="NaN"):
        pred.predict(np.full((1, 48, 48), np.nan, np.float32))


def test_preprocessing_modes() -> None:
    ct = Preprocessor({"mode": "window", "center": 40, "width": 400, "mean": 0.0, "std": 1.0}, (4, 4))
    hu = np.array([[[-1000, -160, 40, 240]] * 4], np.float32)
    np.testing.assert_allclose(ct.to_unit(hu)[0, 0], [0.0, 0.0, 0.5, 1.0], atol=1e-6)
    mr = Preprocessor({"mode": "percentile", "low": 0, "high": 100}, (8, 8), in_chans=3)
    x = mr(np.arange(32, dtype=np.float32).reshape(2, 4, 4))
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x[:, 0], x[:, 2])
    blank = Preprocessor({"mode": "minmax"}, (4, 4)).to_unit(np.ones((1, 4, 4), np.float32))
    assert np.all(blank == 0)
    with pytest.raises(PreprocessError, match="mode"):
        Preprocessor({"mode": "zscore"}, (4, 4))
    with pytest.raises(PreprocessError, match="width"):
        Preprocessor({"mode": "window", "width": 0}, (4, 4))
