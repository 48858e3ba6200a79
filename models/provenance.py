"""What a model package learned from, how it was validated, and on what inputs.

Every package's ``config.json`` carries this under one key, ``provenance``::

    {"training_data": [{"name": "...", "kind": "real" | "synthetic", "cases": 179}],
     "validation": {"method": "internal cross-validation" | "held-out" | "external",
                    "description": "...", "figures": {"accuracy": 0.93, ...},
                    "targets": {"accuracy": 0.95}, "meets_target": false},
     "domain": {"modality": "MR", "series_roles": ["SAG_T2"], "body_part": "lumbar spine"}}

A package is *synthetic-only* when every source of its training data is
synthetic; by default such a package does not report on a patient's study, and
neither does one whose validation declares that it misses its targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.errors import ConfigError

#: Kinds of training data.
DATA_KINDS: tuple[str, ...] = ("real", "synthetic")
#: How a package's figures were measured.
VALIDATION_METHODS: tuple[str, ...] = ("internal cross-validation", "held-out", "external")


@dataclass(frozen=True)
class DataSource:
    """One source of training data."""

    name: str
    kind: str
    cases: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"provenance.training_data.name: must be a non-empty string, got {self.name!r}")
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"provenance.training_data.kind: must be one of {DATA_KINDS}, got {self.kind!r}")
        if not isinstance(self.cases, int) or isinstance(self.cases, bool) or self.cases < 0:
            raise ConfigError(f"provenance.training_data.cases: must be a count >= 0, got {self.cases!r}")


@dataclass(frozen=True)
class Provenance:
    """A package's declared training data, validation and validated domain.

    Raises
    ------
    ConfigError
        (a ``ValueError``) naming the field when a value is missing or invalid.
    """

    training_data: tuple[DataSource, ...]
    validation: dict[str, Any] = field(default_factory=dict)
    domain: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.training_data:
            raise ConfigError("provenance.training_data: must list at least one source")
        method = self.validation.get("method")
        if method not in VALIDATION_METHODS:
            raise ConfigError(f"provenance.validation.method: must be one of {VALIDATION_METHODS}, got {method!r}")
        if not isinstance(self.validation.get("figures", {}), dict):
            raise ConfigError("provenance.validation.figures: must be a mapping")
        if not self.domain.get("modality"):
            raise ConfigError("provenance.domain.modality: must name the modality validated on")

    @classmethod
    def from_dict(cls, data: Any) -> Provenance:
        """Build from the ``provenance`` mapping of ``config.json``.

        Raises
        ------
        ConfigError
            If the mapping is malformed.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"provenance: must be a mapping, got {type(data).__name__}")
        sources = data.get("training_data")
        if not isinstance(sources, list):
            raise ConfigError("provenance.training_data: must be a list of {name, kind, cases}")
        try:
            parsed = tuple(DataSource(s["name"], s["kind"], s["cases"]) for s in sources)
        except (KeyError, TypeError):
            raise ConfigError("provenance.training_data: each source needs name, kind and cases") from None
        validation, domain = data.get("validation"), data.get("domain")
        if not isinstance(validation, dict) or not isinstance(domain, dict):
            raise ConfigError("provenance: validation and domain must be mappings")
        return cls(parsed, dict(validation), dict(domain))

    def to_dict(self) -> dict[str, Any]:
        return {
            "training_data": [{"name": s.name, "kind": s.kind, "cases": s.cases} for s in self.training_data],
            "validation": dict(self.validation),
            "domain": dict(self.domain),
        }

    @property
    def below_target(self) -> bool:
        """True when the validation declares that its figures miss the targets set for the package.

        ``validation.meets_target`` (with ``validation.targets``) is written by the
        training that measured the figures; a package that does not declare it is
        judged by its training data alone.
        """
        return self.validation.get("meets_target") is False

    def missed_targets(self) -> list[str]:
        """``"name figure < target"`` for each declared target the figures miss."""
        figs, targets = self.validation.get("figures", {}), self.validation.get("targets", {})
        return [f"{k} {figs[k]:.2f} < {t:.2f}" for k, t in targets.items()
                if isinstance(figs.get(k), (int, float)) and figs[k] < t]

    @property
    def synthetic_only(self) -> bool:
        """True when every training source is synthetic."""
        return all(s.kind == "synthetic" for s in self.training_data)

    def one_line(self) -> str:
        """Data, validation and domain in one line (``discus models``, the card's first line)."""
        data = " + ".join(f"{s.name} ({s.kind}, {s.cases} cases)" for s in self.training_data)
        figs = self.validation.get("figures", {})
        shown = ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in list(figs.items())[:3]
        )
        dom = self.domain
        where = " ".join(
            str(v if not isinstance(v, (list, tuple)) else "/".join(map(str, v)))
            for v in (dom.get("modality"), dom.get("series_roles") or dom.get("views"), dom.get("body_part"))
            if v
        )
        tag = "SYNTHETIC ONLY" if self.synthetic_only else (
            "real data, BELOW TARGET" if self.below_target else "real data")
        return f"[{tag}] trained on {data}; validated by {self.validation['method']}" + (
            f" ({shown})" if shown else ""
        ) + f"; domain: {where}"


__all__ = ["DATA_KINDS", "DataSource", "Provenance", "VALIDATION_METHODS"]
