"""Errors of the training package, one hierarchy so callers can sort failures by type."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class of every error :mod:`training` raises on purpose."""


class DataError(TrainingError, ValueError):
    """Training or evaluation data are missing, malformed or inconsistent."""


class CheckpointError(TrainingError):
    """A checkpoint cannot be read, or does not fit the model or run it is used for."""
