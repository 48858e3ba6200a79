"""Delivery of result objects to the configured destinations, and the retry policy around it.

One object goes to one destination per task (``discus.export_object``), by C-STORE
(:mod:`dicom_io.scu`) or STOW-RS (:mod:`dicom_io.dicomweb`). Failures arrive as
:class:`dicom_io.errors.ExportError` with ``transient`` set; transient ones are retried
with exponential backoff and jitter until the deadline, then parked in the dead-letter
list, as permanent ones are at once.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path

from dicom_io.errors import ExportError
from worker.index import StudyIndex
from worker.settings import Destination, Settings

log = logging.getLogger(__name__)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt + 1`` (0-based ``attempt``).

    Exponential (``base * 2**attempt``, at most ``cap``) with "equal jitter": half the
    delay is fixed, half random, so retries of many objects spread out but never
    come back at once.

    Raises
    ------
    ValueError
        ``attempt`` is negative or ``base``/``cap`` not positive.
    """
    if attempt < 0:
        raise ValueError(f"attempt: must be >= 0, got {attempt}")
    if base <= 0 or cap <= 0:
        raise ValueError(f"base, cap: must be positive, got {base}, {cap}")
    delay = min(cap, base * 2.0 ** min(attempt, 60))
    rng = rng if rng is not None else random
    return delay / 2 + rng.uniform(0, delay / 2)


def deliver(destination: Destination, path: Path, settings: Settings) -> None:
    """Send one DICOM file to ``destination``.

    Raises
    ------
    dicom_io.errors.ExportError
        The destination did not take it; ``transient`` says whether a retry may succeed.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path.name} is no longer in the outbox", transient=False)
    if destination.kind == "dicomweb":
        from dicom_io.dicomweb import stow

        assert destination.url is not None  # checked by Destination
        stow(destination.url, [path], username=destination.username,
             password=destination.password, timeout=settings.export_soft_time_limit)
    else:
        from dicom_io.scu import raise_for_results, send_files

        raise_for_results(send_files(
            [path], destination.host, destination.port, destination.ae_title, settings.ae_title,
            acse_timeout=settings.acse_timeout, dimse_timeout=settings.dimse_timeout,
            network_timeout=settings.network_timeout))


def echo_destination(destination: Destination, settings: Settings) -> str | None:
    """Check a destination is reachable (C-ECHO, or QIDO for DICOMweb); the problem, or None."""
    try:
        if destination.kind == "dicomweb":
            from dicom_io.dicomweb import qido

            assert destination.url is not None
            qido(destination.url, {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9"},
                 username=destination.username, password=destination.password, timeout=10)
        else:
            from dicom_io.scu import echo

            status = echo(destination.host, destination.port, destination.ae_title,
                          settings.ae_title, timeout=10)
            if status != 0:
                return f"C-ECHO answered status 0x{status:04X}"
    except Exception as exc:  # any failure is the answer here
        return f"{type(exc).__name__}: {exc}"
    return None


def sweep_delivered(index: StudyIndex, settings: Settings, now: float | None = None) -> list[str]:
    """Delete the spooled input and outbox of studies delivered more than the retention period ago.

    A study that received new instances since (unclaimed changes) or whose latest revision is
    not finished is kept. Returns the purged study UIDs.
    """
    from dicom_io.spool import Spool

    now = time.time() if now is None else now
    purged = []
    spool = Spool(settings.spool, fsync=False)
    for uid in index.purge_due(settings.retention_period, now=now):
        if not index.is_settled(uid):
            index.unschedule_purge(uid)  # its newer revision schedules it again when delivered
            continue
        try:
            spool.remove_study(uid)
            shutil.rmtree(settings.outbox / uid, ignore_errors=True)
        except Exception:
            log.exception("could not purge study %s", uid)
            continue
        index.purged(uid)
        purged.append(uid)
        log.info("purged delivered study %s", uid)
    return purged
