"""Model packages: a directory holding a network's weights and the config that travels with them.

Layout (``models/packages/<task>/``): ``config.json`` (:class:`~models.config.ModelConfig`),
the weight file it names (safetensors), ``MODEL_CARD.md``, ``model_card.json`` and plots.
:func:`load_package` refuses a package whose configuration is incomplete or whose
weights do not match the recorded SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import ModelConfig
from models.errors import ConfigError, PackageError, UnknownModelError
from models.registry import Classifier, create_model

#: Packages shipped with the project.
SHIPPED_DIR = Path(__file__).resolve().parent / "packages"
CONFIG_FILE = "config.json"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_package(model: nn.Module, config: ModelConfig, directory: str | Path, fp16: bool = True) -> ModelConfig:
    """Write weights and ``config.json`` into ``directory``; returns the config with its hash.

    Parameters
    ----------
    model : nn.Module
        The trained network (its state dict is saved).
    config : ModelConfig
        Its configuration; ``sha256`` is filled in here.
    directory : str or Path
        Package directory (created).
    fp16 : bool
        Store floating-point tensors in half precision (halves the size; the
        loader casts back to float32).

    Raises
    ------
    TypeError
        If ``config`` is not a ModelConfig.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config: must be a ModelConfig, got {type(config).__name__}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if fp16 and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous().clone()
    weights = out / config.weights
    save_file(state, str(weights), metadata={"architecture": config.architecture, "task": config.task})
    weights.chmod(0o644)  # packages are read by the worker's service user
    data = config.to_dict()
    data["sha256"] = sha256_file(weights)
    final = ModelConfig.from_dict(data)
    (out / CONFIG_FILE).write_text(final.to_json() + "\n", encoding="utf-8")
    return final


def read_config(path: str | Path) -> ModelConfig:
    """Read and check a package's ``config.json`` (not the weights).

    Raises
    ------
    PackageError
        If the directory or config is missing, unreadable or incomplete.
    """
    root = Path(path)
    cfg_path = root / CONFIG_FILE
    if not root.is_dir():
        raise PackageError(f"package {root}: not a directory")
    if not cfg_path.is_file():
        raise PackageError(f"package {root}: no {CONFIG_FILE}")
    try:
        return ModelConfig.from_json(cfg_path)
    except ConfigError as exc:
        raise PackageError(f"package {root}: bad {CONFIG_FILE}: {exc}") from None


def ensemble_sha256(digests: list[str] | tuple[str, ...]) -> str:
    """One digest for an ensemble: SHA-256 of its members' hex digests joined by newlines."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def verify_package(path: str | Path) -> ModelConfig:
    """Check config completeness and the weight files' SHA-256; returns the config.

    A package holds one weight file (its digest in ``sha256``) or an ensemble's
    list of files (their digests in ``weights_sha256``, and in ``sha256`` the
    digest of those, :func:`ensemble_sha256`).

    Raises
    ------
    PackageError
        If the config is incomplete, a weight file is missing, or a hash
        differs from the one recorded.
    """
    root = Path(path)
    cfg = read_config(root)
    if not cfg.sha256:
        raise PackageError(f"package {root}: config records no sha256 for {cfg.weights}")
    files = cfg.weight_files
    wanted = cfg.weights_sha256 if isinstance(cfg.weights, list) else [cfg.sha256]
    for name, want in zip(files, wanted):
        weights = root / name
        if not weights.is_file():
            raise PackageError(f"package {root}: weight file {name} is missing")
        digest = sha256_file(weights)
        if digest != want:
            raise PackageError(
                f"package {root}: {name} has sha256 {digest}, config says {want}; "
                "the weights were changed or corrupted, refusing to load them"
            )
    if isinstance(cfg.weights, list) and cfg.sha256 != ensemble_sha256(cfg.weights_sha256):
        raise PackageError(f"package {root}: sha256 {cfg.sha256} is not the digest of the members' sha256s")
    if cfg.domain_check:
        ref = root / str(cfg.domain_check.get("file", ""))
        if not ref.is_file() or sha256_file(ref) != cfg.domain_check.get("sha256"):
            raise PackageError(f"package {root}: domain reference {ref.name} is missing or its sha256 differs")
    return cfg


def build_model(config: ModelConfig) -> Classifier:
    """The configured architecture with random weights.

    An architecture defined outside the registry's own modules is found through
    ``training["module"]``: a ``models.*`` module whose import registers it.

    Raises
    ------
    PackageError
        If the architecture is unknown or rejects the configured arguments.
    """
    module = config.training.get("module")
    if isinstance(module, str) and module.startswith("models."):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise PackageError(f"architecture module {module!r} cannot be imported: {exc}") from None
    try:
        return create_model(config.architecture, **config.builder_kwargs())
    except UnknownModelError as exc:
        raise PackageError(f"package {config.name}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise PackageError(f"package {config.name}: model_kwargs rejected by {config.architecture}: {exc}") from None


def load_package(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, ModelConfig]:
    """Load a verified package: ``(model in eval mode, float32, on device, config)``.

    Raises
    ------
    PackageError
        If the package fails :func:`verify_package`, the architecture cannot be
        built, or the weights do not fit it.
    """
    root = Path(path)
    cfg = verify_package(root)
    model = build_model(cfg)
    if isinstance(cfg.weights, list):
        raise PackageError(f"package {root}: an ensemble of {cfg.architecture} is loaded by its own task's loader")
    try:
        state = load_file(str(root / cfg.weights))
    except (SafetensorError, OSError) as exc:
        raise PackageError(f"package {root}: cannot read {cfg.weights}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise PackageError(f"package {root}: weights do not fit {cfg.architecture}: {' '.join(first)}") from None
    model.float().eval()
    if device is not None:
        model.to(device)
    return model, cfg


def installed_packages(dirs: list[str | Path] | None = None) -> list[ModelConfig]:
    """Configs of the valid packages found directly under each directory (default: the shipped ones).

    A directory that is itself a package counts too. Invalid packages are skipped;
    use :func:`verify_package` to learn why one is refused.
    """
    found: list[ModelConfig] = []
    for d in dirs if dirs is not None else [SHIPPED_DIR]:
        base = Path(d)
        candidates = [base] if (base / CONFIG_FILE).is_file() else sorted(
            p for p in base.glob("*") if (p / CONFIG_FILE).is_file()
        )
        for p in candidates:
            try:
                found.append(verify_package(p))
            except PackageError:
                continue
    return found


def find_package(task: str, dirs: list[str | Path] | None = None) -> Path:
    """Directory of the first valid package for ``task``.

    Raises
    ------
    PackageError
        If no valid package serves ``task``; the message lists what was found.
    """
    seen = []
    for d in dirs if dirs is not None else [SHIPPED_DIR]:
        base = Path(d)
        candidates = [base] if (base / CONFIG_FILE).is_file() else sorted(base.glob("*"))
        for p in candidates:
            if not (p / CONFIG_FILE).is_file():
                continue
            try:
                cfg = verify_package(p)
            except PackageError as exc:
                seen.append(f"{p.name} (refused: {exc})")
                continue
            if cfg.task == task:
                return p
            seen.append(f"{p.name} (task {cfg.task})")
    raise PackageError(f"no valid package for task {task!r}; found: {', '.join(seen) or 'none'}")


def package_summary(config: ModelConfig) -> dict[str, str]:
    """One line of ``discus models``: name, task, architecture, version, accuracy, provenance."""
    acc = config.metrics.get("accuracy")
    rec = config.provenance_record
    return {
        "name": config.name, "task": config.task, "architecture": config.architecture,
        "version": config.version, "accuracy": f"{acc:.3f}" if isinstance(acc, (int, float)) else "",
        "sha256": config.sha256[:12],
        "provenance": rec.one_line() if rec else "[NO PROVENANCE] declares no training data or validation",
    }


__all__ = [
    "SHIPPED_DIR", "build_model", "ensemble_sha256", "find_package", "installed_packages", "load_package",
    "package_summary", "read_config", "save_package", "sha256_file", "verify_package",
]
