"""Errors raised by :mod:`dicom_io`, one hierarchy so callers sort failures by type."""

from __future__ import annotations


class DicomIOError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidUIDError(DicomIOError, ValueError):
    """A UID is missing, too long or not made of dot-separated digits."""


class SpoolError(DicomIOError):
    """An instance could not be written to the spool."""


class SpoolFullError(SpoolError):
    """The spool's file system is full or over quota (ENOSPC / EDQUOT)."""


class UnreadableDatasetError(DicomIOError):
    """A file or received dataset cannot be parsed as DICOM."""


class GeometryError(DicomIOError):
    """Patient geometry is missing or contradictory, so no volume can be built."""


class PixelDataError(DicomIOError):
    """Pixel data are absent, undecodable or in an unsupported form."""


class SeriesSelectionError(DicomIOError):
    """No series fits a required role; ``candidates`` describes what was seen.

    Parameters
    ----------
    message : str
        What was looked for and why nothing matched.
    candidates : list of str, optional
        One line per series that was considered, with the reason it was not chosen.
    """

    def __init__(self, message: str, candidates: list[str] | None = None) -> None:
        self.candidates = list(candidates or [])
        if self.candidates:
            message = message + "; candidates: " + "; ".join(self.candidates)
        super().__init__(message)


class ExportError(DicomIOError):
    """Sending objects to a destination failed.

    Parameters
    ----------
    message : str
        What failed, with the status or exception seen.
    transient : bool
        ``True`` when retrying later may succeed (connection refused or timed out,
        association rejected transiently, out of resources, HTTP 5xx); ``False``
        when the destination refuses for good (rejected permanently, unsupported
        SOP class, 0xA9xx/0xCxxx statuses, HTTP 4xx).
    status : int, optional
        The DIMSE or HTTP status, when one was received.
    """

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        if not isinstance(transient, bool):
            raise TypeError(f"transient: expected bool, got {type(transient).__name__}")
        super().__init__(message)
        self.transient = transient
        self.status = status


class EncodingError(DicomIOError, ValueError):
    """A StudyResult or a source dataset cannot be encoded as SR / SC; the message names the field."""


class ValidationToolError(DicomIOError):
    """A validation tool (dciodvfy, dsrdump) is missing, hung, or could not read an object."""
