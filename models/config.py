"""The configuration that travels with a model's weights (``config.json`` of a package).

Everything inference needs to rebuild the network and feed it is here: the
architecture and its arguments, input size and channels, the preprocessing
parameters, the class names in output order, plus provenance (version, training
summary, held-out metrics, weight file and its SHA-256).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.errors import ConfigError
from models.provenance import Provenance

#: Keys a package's ``config.json`` must have.
REQUIRED_KEYS: tuple[str, ...] = (
    "name", "architecture", "task", "version", "input_size", "in_chans", "class_names",
    "preprocessing", "model_kwargs", "training", "metrics", "weights", "sha256",
)

#: Keys a package's ``config.json`` may have.
OPTIONAL_KEYS: tuple[str, ...] = (
    "explain", "weights_sha256", "postprocessing", "provenance", "calibration", "domain_check",
)


@dataclass
class ModelConfig:
    """Configuration of one model package.

    Parameters
    ----------
    name : str
        Package name (a model identifier reported in results, e.g. ``discus-mr-disc``).
    architecture : str
        Registered architecture (:func:`models.registry.list_models`).
    task : str
        Task the pipeline looks the package up by (``mr_disc``, ``levels``, ...).
    version : str
        Package version.
    input_size : tuple of int
        Network input ``(H, W)`` in pixels.
    in_chans : int
        Network input channels (grey images are repeated to fill them).
    class_names : list of str
        Output classes in logit order.
    preprocessing : dict
        Parameters of :class:`models.preprocess.Preprocessor` (``mode``, percentiles or
        window, ``mean``, ``std``, ``crop_px``...).
    model_kwargs : dict
        Extra arguments for the architecture builder.
    training, metrics : dict
        Training data summary and strategy; held-out metrics.
    weights : str
        Weight file name inside the package.
    sha256 : str
        Hex SHA-256 of the weight file ("" until exported).
    explain : dict, optional
        Grad-CAM options (``multilayer``: combine several layers); optional key.
    weights_sha256 : list of str, optional
        For an ensemble (``weights`` a list of files): each member's SHA-256; ``sha256``
        is then the digest of these (:func:`models.package.ensemble_sha256`).
    postprocessing : dict, optional
        Parameters of the step after the network (the level localizer's peak rules).
    provenance : dict, optional
        Training data, validation and validated domain (:class:`models.provenance.Provenance`);
        a package without it is treated as unvalidated and does not report on studies.
    calibration : dict, optional
        Temperature scaling fitted on out-of-fold logits (``temperature``, ECE before and after).
    domain_check : dict, optional
        Input-domain reference (:mod:`models.domain`): ``file``, its ``sha256``, ``threshold``
        and the measured shares flagged.

    Raises
    ------
    ConfigError
        (a ``ValueError``) naming the field when a value is missing or inconsistent.
    """

    name: str
    architecture: str
    task: str
    version: str
    input_size: tuple[int, int]
    in_chans: int
    class_names: list[str]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights: str | list[str] = "model.safetensors"
    sha256: str = ""
    explain: dict[str, Any] = field(default_factory=dict)
    weights_sha256: list[str] = field(default_factory=list)
    postprocessing: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    domain_check: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("name", "architecture", "task", "version"):
            val = getattr(self, key)
            if not isinstance(val, str) or not val:
                raise ConfigError(f"{key}: must be a non-empty string, got {val!r}")
        if isinstance(self.weights, (list, tuple)):
            files = list(self.weights)
            digests = list(self.weights_sha256)
            if not files or not all(isinstance(w, str) and w for w in files) or len(digests) != len(files):
                raise ConfigError(
                    f"weights: an ensemble needs equally long 'weights' and 'weights_sha256' lists, "
                    f"got {self.weights!r} and {self.weights_sha256!r}"
                )
            self.weights, self.weights_sha256 = files, [str(d) for d in digests]
        elif not isinstance(self.weights, str) or not self.weights:
            raise ConfigError(f"weights: must be a file name or a list of them, got {self.weights!r}")
        try:
            size = tuple(int(v) for v in self.input_size)
        except (TypeError, ValueError):
            raise ConfigError(f"input_size: must be [H, W], got {self.input_size!r}") from None
        if len(size) != 2 or min(size) < 8:
            raise ConfigError(f"input_size: must be [H, W] with both >= 8, got {self.input_size!r}")
        self.input_size = size  # type: ignore[assignment]
        if not isinstance(self.in_chans, int) or self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans: must be 1 or 3, got {self.in_chans!r}")
        names = list(self.class_names) if isinstance(self.class_names, (list, tuple)) else None
        if not names or len(names) < 2 or len(set(names)) != len(names) or not all(
            isinstance(n, str) and n for n in names
        ):
            raise ConfigError(f"class_names: need >= 2 distinct non-empty names, got {self.class_names!r}")
        self.class_names = names
        for key in ("preprocessing", "model_kwargs", "training", "metrics", "explain", "postprocessing",
                    "provenance", "calibration", "domain_check"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key}: must be a mapping, got {type(getattr(self, key)).__name__}")
        if not isinstance(self.sha256, str) or (
            self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256))
        ):
            raise ConfigError(f"sha256: must be 64 lower-case hex digits, got {self.sha256!r}")
        if self.provenance:
            Provenance.from_dict(self.provenance)  # raises ConfigError naming the bad field
        temp = self.calibration.get("temperature", 1.0)
        if not isinstance(temp, (int, float)) or not temp > 0:
            raise ConfigError(f"calibration.temperature: must be a positive number, got {temp!r}")

    @property
    def weight_files(self) -> list[str]:
        """The weight files: one, or an ensemble's members."""
        return list(self.weights) if isinstance(self.weights, list) else [self.weights]

    @property
    def provenance_record(self) -> Provenance | None:
        """The parsed provenance, or None when the package declares none."""
        return Provenance.from_dict(self.provenance) if self.provenance else None

    @property
    def synthetic_only(self) -> bool:
        """True when the package was trained on synthetic data only (or declares no provenance)."""
        rec = self.provenance_record
        return True if rec is None else rec.synthetic_only

    @property
    def temperature(self) -> float:
        """Calibration temperature (1.0 when the package was not calibrated)."""
        return float(self.calibration.get("temperature", 1.0))

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.class_names)

    def builder_kwargs(self) -> dict[str, Any]:
        """Arguments for :func:`models.registry.create_model` (``model_kwargs`` + classes + channels)."""
        return {**self.model_kwargs, "num_classes": self.num_classes, "in_chans": self.in_chans}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, keys as in ``config.json``."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` mapping.

        Raises
        ------
        ConfigError
            If a required key is missing (all missing keys are named) or a value is invalid.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"config: must be a JSON object, got {type(data).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ConfigError(f"config: missing keys {', '.join(missing)}")
        known = {k: data[k] for k in REQUIRED_KEYS}
        for key in OPTIONAL_KEYS:
            if key in data:
                known[key] = data[key]
        return cls(**known)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json``.

        Raises
        ------
        ConfigError
            If the file is not valid JSON or the configuration is incomplete.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _json_default(o: Any) -> Any:
    # numpy scalars and arrays from metrics
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
