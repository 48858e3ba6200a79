"""Deterministic UIDs for every object Discus writes.

A retried task must re-send the same objects instead of duplicating them in the
PACS, so output UIDs are derived from what the output depends on (study,
revision, model versions, object kind) rather than drawn at random. The UIDs use
the ``2.25`` root (ISO/IEC 9834-8, PS3.5 B.2): a 128-bit integer, here the first
128 bits of a SHA-256 of the parts.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

#: Object kinds and the series each one goes into; a kind's series holds only it.
KINDS: tuple[str, ...] = ("sr", "key_image", "heatmap", "seg")

#: Series Number used for each kind, high so it sorts after the acquired series.
SERIES_NUMBERS: dict[str, int] = {"sr": 9901, "key_image": 9902, "heatmap": 9903, "seg": 9904}

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def deterministic_uid(*parts: str) -> str:
    """A ``2.25.<int>`` UID from a SHA-256 of the parts.

    Parameters
    ----------
    *parts : str
        What the UID identifies; the same parts give the same UID. The parts are
        joined with a separator that cannot occur in them by accident, so
        ``("a", "bc")`` and ``("ab", "c")`` differ.

    Returns
    -------
    str
        A UID of at most 44 characters (``2.25.`` and up to 39 digits).

    Raises
    ------
    ValueError
        If no part is given.
    TypeError
        If a part is not a string.
    """
    if not parts:
        raise ValueError("parts: at least one part is required")
    for i, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(f"parts[{i}]: expected str, got {type(part).__name__}")
    digest = hashlib.sha256("\x1f".join(f"{len(p)}:{p}" for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def output_uids(
    study_uid: str,
    revision: int,
    model_versions: Sequence[str],
    kind: str,
    index: int = 0,
) -> tuple[str, str]:
    """Series and SOP Instance UIDs of one output object.

    Parameters
    ----------
    study_uid : str
        Study Instance UID of the analysed study.
    revision : int
        Analysis revision (>= 1); a new revision makes new objects.
    model_versions : sequence of str
        Versions of the models that produced the result; order does not matter.
    kind : str
        One of :data:`KINDS`.
    index : int, optional
        Position of the object within its series (heatmaps), default 0.

    Returns
    -------
    tuple of str
        ``(series_instance_uid, sop_instance_uid)``.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, ``revision`` < 1, ``index`` < 0 or ``study_uid`` is empty.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(study_uid, str) or not study_uid:
        raise ValueError(f"study_uid: expected a non-empty UID, got {study_uid!r}")
    if not isinstance(revision, int) or revision < 1:
        raise ValueError(f"revision: must be an int >= 1, got {revision!r}")
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index: must be an int >= 0, got {index!r}")
    versions = ",".join(sorted(str(v) for v in model_versions))
    series = deterministic_uid("discus-series", study_uid, str(revision), versions, kind)
    sop = deterministic_uid("discus-instance", series, str(index))
    return series, sop


def device_uid(weights_sha256: str) -> str:
    """Device UID of a trained model: changes whenever the weights change.

    Parameters
    ----------
    weights_sha256 : str
        Hex SHA-256 of the model's weights file (64 hex digits, any case).

    Raises
    ------
    ValueError
        If ``weights_sha256`` is not 64 hex digits.
    """
    if not isinstance(weights_sha256, str) or not _SHA256_HEX.match(weights_sha256.lower()):
        raise ValueError(f"weights_sha256: expected 64 hex digits, got {weights_sha256!r}")
    return deterministic_uid("discus-device", weights_sha256.lower())
