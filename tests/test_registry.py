"""Registry: every registered architecture builds, runs forward and backward, and packs into a config."""

from __future__ import annotations

import pytest
import torch

from models.config import REQUIRED_KEYS, ModelConfig
from models.errors import ConfigError, UnknownModelError
from models.registry import Classifier, create_model, list_models, model_entry, register_model

torch.set_num_threads(1)

EXPECTED = {"vit_ldh", "attention_cnn_lss", "resnet18", "resnet50", "vgg16", "densenet201"}


def small_input_kwargs(name: str) -> dict:
    return {"img_size": 64, "patch_size": 16} if name == "vit_ldh" else {}


def test_papers_architectures_are_registered() -> None:
    assert EXPECTED <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(UnknownModelError) as exc:
        create_model("not_a_model")
    for name in EXPECTED:
        assert name in str(exc.value)


def test_duplicate_registration_is_refused() -> None:
    def resnet18(**kwargs: object) -> Classifier:  # same name, different builder
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet18)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_backward_and_config(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, small=True, num_classes=3, in_chans=1, **small_input_kwargs(name))
    assert isinstance(model, Classifier)
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 3)
    out[:, 1].sum().backward()
    grads = [p.grad for p in model.head_parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert model.cam_target_layers() and model.cam_target_layers(multilayer=True)
    entry = model_entry(name)
    cfg = ModelConfig(
        name=f"test-{name}", architecture=name, task="mr_disc", version="0.0.1", input_size=(64, 64),
        in_chans=1, class_names=["normal", "bulging", "herniation"],
        preprocessing={"mode": "percentile"}, model_kwargs={**entry.small_kwargs, **small_input_kwargs(name)},
    )
    data = cfg.to_dict()
    assert set(REQUIRED_KEYS) <= set(data)
    again = create_model(data["architecture"], **ModelConfig.from_dict(data).builder_kwargs())
    assert again(x).shape == (2, 3)
    again.load_state_dict(model.state_dict())


def test_vit_default_is_paper_a_configuration() -> None:
    model = create_model("vit_ldh")
    net = model.net
    assert net.patch_embed.patch_size == (32, 32)
    assert net.embed_dim == 1536 and len(net.blocks) == 12
    assert net.blocks[0].attn.num_heads == 12
    assert net.blocks[0].mlp.fc1.out_features == 2048
    n = sum(p.numel() for p in model.parameters())
    assert 185e6 < n < 200e6  # paper A: about 194 M with three input channels


def test_constructors_validate_arguments() -> None:
    with pytest.raises(ValueError, match="img_size"):
        create_model("vit_ldh", img_size=100, patch_size=32)
    with pytest.raises(ValueError, match="width"):
        create_model("attention_cnn_lss", width=0)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)


def test_config_validation_names_the_field() -> None:
    good = dict(name="x", architecture="resnet18", task="xray", version="1", input_size=[64, 64],
                in_chans=1, class_names=["a", "b"], preprocessing={}, model_kwargs={}, training={},
                metrics={}, weights="model.safetensors", sha256="")
    ModelConfig.from_dict(good)
    with pytest.raises(ConfigError, match="missing keys preprocessing, sha256"):
        ModelConfig.from_dict({k: v for k, v in good.items() if k not in ("preprocessing", "sha256")})
    with pytest.raises(ConfigError, match="class_names"):
        ModelConfig.from_dict({**good, "class_names": ["a", "a"]})
    with pytest.raises(ConfigError, match="sha256"):
        ModelConfig.from_dict({**good, "sha256": "xyz"})
    with pytest.raises(ConfigError, match="input_size"):
        ModelConfig.from_dict({**good, "input_size": [64]})
