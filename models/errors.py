"""Errors of the networks package, one hierarchy so callers can sort failures by type."""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error :mod:`models` raises on purpose."""


class UnknownModelError(ModelError, KeyError):
    """No architecture of that name is registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ConfigError(ModelError, ValueError):
    """A model configuration is incomplete or inconsistent."""


class PackageError(ModelError):
    """A model package cannot be used: missing files, wrong hash, bad config or weights."""


class PreprocessError(ModelError, ValueError):
    """Input images do not fit the preprocessing a model expects."""
