"""Registry of architectures, in the timm style.

Architectures register themselves with :func:`register_model`; callers build them
by name with :func:`create_model` and list them with :func:`list_models`. Every
registered builder returns a :class:`Classifier`, which also knows where Grad-CAM
looks in it. The modules that define architectures are imported on first use so
that importing the registry stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from models.errors import UnknownModelError

#: Modules whose import registers architectures.
_ARCHITECTURE_MODULES: tuple[str, ...] = ("models.vit", "models.attention_cnn", "models.baselines")


class Classifier(nn.Module):
    """Base class of every registered network: images ``[N, C, H, W]`` -> logits ``[N, K]``.

    Subclasses tell Grad-CAM where to look (:meth:`cam_target_layers`, and for
    token models :meth:`cam_reshape_transform`) and which parameters form the
    classification head (:meth:`head_parameters`, used by the frozen-backbone
    training strategy).
    """

    def cam_target_layers(self, multilayer: bool = False) -> list[nn.Module]:
        """Layers whose activations and gradients Grad-CAM combines.

        Parameters
        ----------
        multilayer : bool
            Combine several layers (paper A's multi-layer variant) instead of the last one.
        """
        raise NotImplementedError

    def cam_reshape_transform(self) -> Callable[[Any], Any] | None:
        """Map a target layer's output to ``[N, C, h, w]``; None when it already is."""
        return None

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the classification head (trained alone under the frozen strategy)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    ``small_kwargs`` build a reduced configuration of the same architecture, used by
    tests and by the shipped demo packages.
    """

    name: str
    builder: Callable[..., Classifier]
    small_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}
_loaded = False


def register_model(
    fn: Callable[..., Classifier] | None = None,
    *,
    small: dict[str, Any] | None = None,
    description: str = "",
) -> Any:
    """Register an architecture builder under its function name.

    Usable bare (``@register_model``) or with options
    (``@register_model(small={...}, description="...")``).

    Raises
    ------
    ValueError
        If the name is already registered.
    """

    def wrap(f: Callable[..., Classifier]) -> Callable[..., Classifier]:
        name = f.__name__
        if name in _REGISTRY and _REGISTRY[name].builder is not f:
            raise ValueError(f"name: architecture {name!r} is already registered")
        doc = (f.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(name, f, dict(small or {}), description or (doc[0] if doc else ""))
        return f

    if fn is not None:
        return wrap(fn)
    return wrap


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in _ARCHITECTURE_MODULES:
            importlib.import_module(mod)
        _loaded = True


def list_models() -> list[str]:
    """Names of the registered architectures, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``.

    Raises
    ------
    UnknownModelError
        If no architecture of that name is registered; the message lists the known ones.
    """
    _load_all()
    if name not in _REGISTRY:
        raise UnknownModelError(
            f"name: unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def create_model(name: str, small: bool = False, **kwargs: Any) -> Classifier:
    """Build a registered architecture with random weights.

    Parameters
    ----------
    name : str
        Registered architecture name (see :func:`list_models`).
    small : bool
        Start from the architecture's reduced configuration; ``kwargs`` still override it.
    **kwargs
        Passed to the builder (``num_classes``, ``in_chans``, ``img_size`` and
        architecture-specific options).

    Raises
    ------
    UnknownModelError
        If ``name`` is not registered.
    """
    entry = model_entry(name)
    params = {**(entry.small_kwargs if small else {}), **kwargs}
    return entry.builder(**params)
