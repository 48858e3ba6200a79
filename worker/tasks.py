"""The Celery tasks: thin wrappers that look up, hand off and record.

``discus.analyze_study(study_uid, revision)`` runs :func:`worker.pipeline.analyze_study` on the
spooled study, encodes the SR/SC objects into ``<outbox>/<study>/<revision>/`` and queues one
``discus.export_object(study_uid, revision, path, destination, deadline)`` per object and
destination, each as soon as its file is written. Tasks carry UIDs, paths and times only; state
lives in the study index.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from worker.celery_app import ANALYZE_TASK, EXPORT_QUEUE, EXPORT_TASK, app
from worker.errors import JobNotFoundError
from worker.index import StudyIndex
from worker.settings import Settings

log = get_task_logger(__name__)
for _noisy in ("pynetdicom", "highdicom"):  # per-object INFO lines drown the study lines
    logging.getLogger(_noisy).setLevel(logging.WARNING)

#: Job states after which a redelivered analysis message has nothing left to do.
FINISHED = frozenset({"exporting", "done", "export_failed", "failed", "superseded"})
RESULT_FILE = "result.json"

_settings: Settings = app.discus_settings  # type: ignore[attr-defined]
_index: StudyIndex | None = None


def index() -> StudyIndex:
    """The process's study index (one connection pool per process)."""
    global _index
    if _index is None:
        _index = StudyIndex.from_url(_settings.redis_url)
    return _index


def outbox_for(settings: Settings, study_uid: str, revision: int) -> Path:
    return settings.outbox / study_uid / str(revision)


def _previous_sr(idx: StudyIndex, study_uid: str, revision: int) -> Path | None:
    """The SR of the latest earlier revision that produced one, for the new SR to supersede."""
    for rev in range(revision - 1, 0, -1):
        try:
            sr = idx.job(study_uid, rev).get("sr")
        except JobNotFoundError:
            continue
        if sr and Path(sr).is_file():
            return Path(sr)
    return None


def _is_sr(path: Path) -> bool:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.88.")


def queue_exports(settings: Settings, study_uid: str, revision: int, files: list[Path],
                  deadline: float | None = None) -> int:
    """Queue one export per file and destination; return how many were queued."""
    deadline = time.time() + settings.export_deadline if deadline is None else deadline
    n = 0
    for dest in settings.destinations:
        for f in files:
            export_object.apply_async(
                args=[study_uid, revision, str(f), dest.name, deadline], queue=EXPORT_QUEUE)
            n += 1
    return n


@app.task(name=ANALYZE_TASK, bind=True, soft_time_limit=_settings.analyze_soft_time_limit,
          time_limit=_settings.analyze_time_limit)
def analyze_study(self: Any, study_uid: str, revision: int) -> dict[str, Any]:
    """Analyse revision ``revision`` of the spooled study ``study_uid`` and queue its exports."""
    settings, idx = _settings, index()
    try:
        job = idx.job(study_uid, revision)
    except JobNotFoundError:
        log.error("no job for study %s revision %s; message dropped", study_uid, revision)
        return {"state": "unknown"}
    if job.get("state") in FINISHED:
        # A redelivered message (its first worker died after finishing): nothing to redo.
        return {"state": job["state"]}
    if idx.latest_revision(study_uid) > revision:
        idx.set_job(study_uid, revision, state="superseded",
                    reason="a newer revision of the study was queued")
        return {"state": "superseded"}
    attempts = idx.start_attempt(study_uid, revision)
    if attempts > settings.attempt_cap:
        reason = (f"gave up after {settings.attempt_cap} attempts (each ended with its worker "
                  f"lost or killed)")
        idx.fail(study_uid, revision, reason)
        log.error("study %s revision %s: %s", study_uid, revision, reason)
        return {"state": "failed", "reason": reason}

    from worker.pipeline import OutputStream
    from worker.pipeline import analyze_study as run_pipeline

    t0 = time.time()
    folder = settings.spool / study_uid
    out = outbox_for(settings, study_uid, revision)
    files: list[Path] = []
    try:
        result = run_pipeline(folder, revision, settings=settings)
        t1 = time.time()
        stream = OutputStream(result, folder, out, predecessor=_previous_sr(idx, study_uid, revision),
                              not_performed_sr=settings.write_not_performed_sr)
        # How many deliveries finish the job is known before anything is encoded, so each
        # object goes to the export queue as soon as it is on disk: the SR first, travelling
        # to the PACS while the heatmaps are still being made.
        objects = len(stream)
        if objects and settings.destinations:
            idx.expect_exports(study_uid, revision, objects, len(settings.destinations))
        deadline = time.time() + settings.export_deadline
        for f in stream:
            files.append(f)
            queue_exports(settings, study_uid, revision, [f], deadline)
        t2 = time.time()
        (out / RESULT_FILE).write_text(result.to_json())
    except SoftTimeLimitExceeded:
        reason = f"analysis exceeded its time limit of {settings.analyze_soft_time_limit:.0f} s"
        idx.fail(study_uid, revision, reason)
        return {"state": "failed", "reason": reason}
    except Exception as exc:  # a bug or a broken outbox; the study gets the reason
        log.exception("study %s revision %s failed", study_uid, revision)
        reason = f"{type(exc).__name__}: {exc}"
        if files:
            reason += f" (after {len(files)} object(s) had been queued for export; they are delivered)"
        idx.fail(study_uid, revision, reason)
        return {"state": "failed", "reason": reason}

    sr = next((str(f) for f in files if _is_sr(f)), "")
    queued_at = float(job.get("queued_at", t0))
    timings = {"queue_wait": t0 - queued_at, "analysis": t1 - t0, "encode": t2 - t1,
               **{f"pipeline.{k}": v for k, v in result.timings.items()}}
    fields: dict[str, Any] = {
        "result": result.status.value, "outputs": [str(f) for f in files], "sr": sr,
        "timings": timings, "not_run": result.not_run, "warnings": len(result.warnings),
        "encoded_at": repr(t2),
    }
    if result.reason:
        fields["reason"] = result.reason
    idx.set_job(study_uid, revision, study_state=None, **fields)
    if result.reason:
        idx.r.hset(idx.study_key(study_uid), "reason", result.reason)
    if not (objects and settings.destinations):  # nothing to deliver: done once the result is recorded
        idx.expect_exports(study_uid, revision, objects, len(settings.destinations))
    idx.mark_exporting(study_uid, revision)
    log.info("study %s revision %s: %s, %d objects, %d findings", study_uid, revision,
             result.status.value, len(files), len(result.findings))
    return {"state": "exporting", "result": result.status.value, "objects": len(files)}


@app.task(name=EXPORT_TASK, bind=True, max_retries=None,
          soft_time_limit=_settings.export_soft_time_limit, time_limit=_settings.export_time_limit)
def export_object(self: Any, study_uid: str, revision: int, path: str, destination: str,
                  deadline: float) -> dict[str, Any]:
    """Send one outbox file to one destination; retry transient failures until ``deadline``."""
    from dicom_io.errors import ExportError
    from worker.export import backoff_delay, deliver

    settings, idx = _settings, index()
    attempts = self.request.retries + 1
    try:
        dest = settings.destination(destination)
    except KeyError:
        idx.add_dead_letter(study_uid, revision, path, destination,
                            f"destination {destination!r} is not configured", attempts)
        return {"state": "dead"}
    t0 = time.time()
    try:
        deliver(dest, Path(path), settings)
    except (ExportError, SoftTimeLimitExceeded) as exc:
        transient = isinstance(exc, SoftTimeLimitExceeded) or exc.transient
        reason = f"{type(exc).__name__}: {exc}"
        if transient:
            countdown = backoff_delay(self.request.retries, settings.export_backoff_base,
                                      settings.export_backoff_max)
            if time.time() + countdown <= deadline:
                log.warning("export of %s to %s failed (%s); retry %d in %.1f s",
                            Path(path).name, destination, reason, attempts, countdown)
                raise self.retry(countdown=countdown, exc=exc)
            reason = f"deadline passed after {attempts} attempts; last: {reason}"
        dl = idx.add_dead_letter(study_uid, revision, path, destination, reason, attempts)
        log.error("export of %s to %s dead-lettered (%s): %s", Path(path).name, destination,
                  dl.id, reason)
        return {"state": "dead", "id": dl.id}
    finished = idx.exported(study_uid, revision, destination, Path(path).name)
    idx.r.hset(idx.job_key(study_uid, revision), "last_export_s", json.dumps(time.time() - t0))
    return {"state": "done" if finished else "sent"}
