"""Errors of the daemon, one hierarchy so callers can sort failures by type."""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error the daemon raises on purpose."""


class ConfigurationError(WorkerError):
    """The settings cannot work (unknown destination, unreachable folder, ...)."""


class StudyIndexError(WorkerError):
    """The study index in Redis is unreachable or inconsistent."""


class JobNotFoundError(WorkerError):
    """No job or study with that identifier is known to the index."""


class DeadLetterError(WorkerError):
    """A dead-letter entry cannot be read or replayed."""
