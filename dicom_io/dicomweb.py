"""STOW-RS and QIDO-RS through dicomweb-client, with failures sorted into transient and permanent.

Failures become :class:`dicom_io.errors.ExportError`: connection errors,
timeouts, HTTP 5xx, 408 and 429 are transient; other HTTP 4xx, and instances the
server lists as failed with a status other than 0xA7xx, are permanent. The
client's own retries are turned off: the caller retries with backoff.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom import dcmread

from dicom_io.errors import ExportError

LOGGER = logging.getLogger(__name__)

_TRANSIENT_HTTP = frozenset({408, 429})


def _client(url: str, username: str | None, password: str | None, timeout: float) -> DICOMwebClient:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"url: expected an http(s) URL, got {url!r}")
    if (username is None) != (password is None):
        raise ValueError("username, password: give both or neither")
    session = create_session_from_user_pass(username, password) if username is not None else requests.Session()
    client = DICOMwebClient(url, session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client


def _http_error(exc: requests.RequestException, what: str) -> ExportError:
    """An ExportError for a failed request: transient unless the server refused for good."""
    response = getattr(exc, "response", None)
    if response is None:  # connection refused, DNS, timeout: nothing answered
        return ExportError(f"{what}: {type(exc).__name__}: {exc}", transient=True)
    code = int(response.status_code)
    transient = code >= 500 or code in _TRANSIENT_HTTP
    return ExportError(f"{what}: HTTP {code} {response.reason}", transient=transient, status=code)


def stow(
    url: str,
    paths: Iterable[str | os.PathLike[str]],
    *,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 60.0,
) -> list[str]:
    """Store files on a DICOMweb server (STOW-RS) as they are encoded.

    Parameters
    ----------
    url : str
        The DICOMweb base URL (e.g. ``http://pacs:8042/dicom-web``).
    paths : iterable of path
        DICOM files to store in one request.
    username, password : str, optional
        HTTP basic authentication.
    timeout : float
        Seconds for connecting and for the response.

    Returns
    -------
    list of str
        SOP Instance UIDs the server reports as stored (those sent when the
        server's response lists none).

    Raises
    ------
    ExportError
        If the request fails or any instance is reported failed.
    ValueError
        If ``url`` is not an http(s) URL, or only one of username/password is given.
    """
    paths = [Path(p) for p in paths]
    client = _client(url, username, password, timeout)
    try:
        datasets = [dcmread(p) for p in paths]
    except Exception as exc:  # an unreadable file will never be stored
        raise ExportError(f"cannot read a file to send ({type(exc).__name__}: {exc})", transient=False) from exc
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        response = client.store_instances(datasets)
    except requests.RequestException as exc:
        raise _http_error(exc, f"STOW-RS to {url}") from exc
    failed = list(response.get("FailedSOPSequence", []))
    if failed:
        reasons = [int(item.get("FailureReason", 0x0110)) for item in failed]
        transient = all((r & 0xFF00) == 0xA700 for r in reasons)
        raise ExportError(
            f"STOW-RS to {url}: {len(failed)} of {len(sent)} instances failed "
            f"(reasons {', '.join(f'0x{r:04X}' for r in reasons)})",
            transient=transient,
            status=reasons[0],
        )
    stored = [str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])]
    LOGGER.info("stored %d instances at %s", len(stored) or len(sent), url)
    return stored or sent


def qido(
    url: str,
    search_filters: Mapping[str, Any],
    *,
    level: str = "instances",
    username: str | None = None,
    password: str | None = None,
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """Search a DICOMweb server (QIDO-RS).

    Parameters
    ----------
    url : str
        The DICOMweb base URL.
    search_filters : mapping
        Attribute keyword or tag to value, e.g. ``{"StudyInstanceUID": uid}``.
    level : {"studies", "series", "instances"}
        What to search for.
    username, password : str, optional
        HTTP basic authentication.
    timeout : float
        Seconds for connecting and for the response.

    Returns
    -------
    list of dict
        The matches in DICOM JSON.

    Raises
    ------
    ExportError
        If the request fails.
    ValueError
        If ``level`` is not one of the three levels or ``url`` is not http(s).
    """
    client = _client(url, username, password, timeout)
    search = {
        "studies": client.search_for_studies,
        "series": client.search_for_series,
        "instances": client.search_for_instances,
    }.get(level)
    if search is None:
        raise ValueError(f"level: expected studies, series or instances, got {level!r}")
    try:
        return list(search(search_filters=dict(search_filters)))
    except requests.RequestException as exc:
        raise _http_error(exc, f"QIDO-RS at {url}") from exc


def qido_instances(url: str, study_uid: str, **kwargs: Any) -> list[dict[str, Any]]:
    """The instances of one study on a DICOMweb server (see :func:`qido`)."""
    return qido(url, {"StudyInstanceUID": study_uid}, level="instances", **kwargs)
