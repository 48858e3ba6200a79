"""The listener process: the DICOM SCP, the study index it feeds, and the stability monitor.

Every stored instance is recorded in the study index (``on_stored``). A monitor thread
finds studies with no new instance for the quiet period, claims the next revision
atomically (several listeners may run against one Redis and one spool) and queues
``discus.analyze_study``. A slower sweep purges delivered studies after the retention
period. SIGTERM stops accepting associations, lets running ones finish, and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from dicom_io.headers import is_own_output
from dicom_io.scp import ListenerConfig, ListenerStats, StoredInstance, start_listener
from dicom_io.spool import Spool
from dicom_io.transport import LeanAssociationServer, NoDelayThreadedAssociationServer, lean_transport_problems
from worker.index import StudyIndex, dataset_digest
from worker.settings import Settings

log = logging.getLogger(__name__)

#: Seconds after which a claimed job that was never queued is queued by another monitor.
UNSENT_AFTER = 30.0
#: Seconds a SIGTERM waits for running associations before the process exits.
SHUTDOWN_GRACE = 20.0


class StabilityMonitor:
    """Claims quiet studies and queues their analysis.

    Parameters
    ----------
    index : StudyIndex
        The shared study index.
    settings : Settings
        Quiet period, monitor and sweep intervals, retention.
    enqueue : callable, optional
        ``enqueue(study_uid, revision) -> task id``; default sends ``discus.analyze_study``.
    """

    def __init__(self, index: StudyIndex, settings: Settings, enqueue: Any = None) -> None:
        if not isinstance(index, StudyIndex):
            raise TypeError(f"index: expected StudyIndex, got {type(index).__name__}")
        if not isinstance(settings, Settings):
            raise TypeError(f"settings: expected Settings, got {type(settings).__name__}")
        self.index = index
        self.settings = settings
        self.enqueue = enqueue if enqueue is not None else send_analysis
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = 0.0

    def tick(self, now: float | None = None) -> list[tuple[str, int]]:
        """One pass: claim every quiet study and queue it; return what was queued."""
        queued = []
        quiet = self.settings.quiet_period
        for uid in self.index.quiet_candidates(quiet, now=now):
            revision = self.index.claim(uid, quiet, now=now)
            if revision > 0:
                task_id = self.enqueue(uid, revision)
                self.index.mark_enqueued(uid, revision, task_id)
                log.info("study %s quiet for %.1f s: queued revision %d", uid, quiet, revision)
                queued.append((uid, revision))
        # A claim whose enqueue never happened (the claimer died in between): send it now.
        for uid, revision in self.index.unsent_jobs(older_than=UNSENT_AFTER, now=now):
            if self.index.lock(f"send:{uid}:{revision}", UNSENT_AFTER):
                self.index.mark_enqueued(uid, revision, self.enqueue(uid, revision))
                log.warning("study %s revision %d was claimed but never queued: queued now",
                            uid, revision)
                queued.append((uid, revision))
        return queued

    def sweep(self, now: float | None = None) -> list[str]:
        from worker.export import sweep_delivered

        return sweep_delivered(self.index, self.settings, now=now)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                now = time.time()
                if now - self._last_sweep >= self.settings.sweep_interval:
                    self._last_sweep = now
                    self.sweep(now)
            except Exception:  # Redis away for a moment: log and keep going
                log.exception("monitor pass failed; retrying")
            self._stop.wait(self.settings.monitor_interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="discus-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def send_analysis(study_uid: str, revision: int) -> str:
    """Queue ``discus.analyze_study`` for one revision; the task id names the job."""
    from worker.celery_app import ANALYZE_QUEUE, ANALYZE_TASK, app

    task_id = f"analyze-{study_uid}-{revision}"
    app.send_task(ANALYZE_TASK, args=[study_uid, revision], queue=ANALYZE_QUEUE, task_id=task_id)
    return task_id


def make_on_stored(index: StudyIndex, spool: Spool | None = None) -> Any:
    """The ``on_stored`` callback: record the instance (duplicates included) in the index.

    A duplicate is recorded too: if an earlier callback failed, the sender's retry is
    how the index catches up; an identical digest changes nothing. The digest is the
    listener's, computed from the bytes received; the file is read only if it has none.
    With ``spool``, Discus's own SR and SC objects sent back are set aside in the
    spool's ``returned`` folder instead: answered Success, on disk, never analysed.
    """

    def on_stored(inst: StoredInstance) -> None:
        if spool is not None and is_own_output(inst.path, inst.sop_class_uid):
            # our own result sent back (a PACS routing the whole study): kept, never analysed
            where = spool.set_aside(inst.path, inst.study_instance_uid)
            log.info("study %s: own output %s sent back; kept in %s, not analysed",
                     inst.study_instance_uid, inst.sop_instance_uid, where.parent)
            return
        index.record_instance(inst.study_instance_uid, inst.sop_instance_uid,
                              inst.digest or dataset_digest(inst.path), inst.path.parent.parent)

    return on_stored


def listener_config(settings: Settings) -> ListenerConfig:
    return ListenerConfig(
        ae_title=settings.ae_title, host=settings.bind, port=settings.port,
        allowed_calling_aets=tuple(settings.allowed_calling_aets),
        max_associations=settings.max_associations, acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout, network_timeout=settings.network_timeout,
    )


class _ReusePortMixin:
    """Binds with ``SO_REUSEPORT``, so several listener processes share one port.

    The kernel spreads incoming associations over the processes, which lifts the
    one-interpreter limit on concurrent senders.
    """

    def server_bind(self) -> None:
        # pynetdicom's server_bind sets only SO_REUSEADDR; add SO_REUSEPORT before it binds.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # type: ignore[attr-defined]
        super().server_bind()  # type: ignore[misc]


class ReusePortAssociationServer(_ReusePortMixin, LeanAssociationServer):
    """The lean server sharing its port with other listener processes."""


class ReusePortStockServer(_ReusePortMixin, NoDelayThreadedAssociationServer):
    """pynetdicom's own server (``TCP_NODELAY`` set) sharing its port with other listener processes."""


def server_class(settings: Settings, reuse_port: bool) -> type:
    """The server the listener runs: the lean one, or pynetdicom's own where that is safer.

    ``listener_server = "auto"`` takes the lean server when the installed pynetdicom
    is the release it was written for (and every private member it uses is there),
    else pynetdicom's own server with a warning; ``"lean"`` insists (and refuses to
    start otherwise); ``"stock"`` always takes pynetdicom's.

    Raises
    ------
    RuntimeError
        If ``"lean"`` is asked for and the installed pynetdicom does not fit it.
    """
    mode = settings.listener_server
    problems = lean_transport_problems() if mode != "stock" else []
    if mode == "lean" and problems:
        raise RuntimeError("listener_server = 'lean', but: " + "; ".join(problems))
    if mode == "stock" or problems:
        if problems:
            log.warning("lean transport disabled (%s); using pynetdicom's own server", "; ".join(problems))
        return ReusePortStockServer if reuse_port else NoDelayThreadedAssociationServer
    return ReusePortAssociationServer if reuse_port else LeanAssociationServer


def start_server(settings: Settings, on_stored: Any, stats: ListenerStats, reuse_port: bool,
                 spool: Spool | None = None) -> Any:
    """Start the SCP in a background thread; return the server (``shutdown()`` stops it)."""
    return start_listener(spool or Spool(settings.spool), listener_config(settings), on_stored, stats,
                          server_class=server_class(settings, reuse_port))


def serve(settings: Settings, stop: threading.Event | None = None, *, monitor: bool = True) -> ListenerStats:
    """Run the listener (and its monitor) until SIGTERM/SIGINT or ``stop`` is set.

    With ``settings.listener_processes`` > 1 the extra processes are started here, share
    the port (``SO_REUSEPORT``) and stop with this one; only this one runs the monitor.
    Returns this process's counters at shutdown.
    """
    stop = stop if stop is not None else threading.Event()
    index = StudyIndex.from_url(settings.redis_url)
    index.r.ping()  # fail at start, not at the first instance
    spool = Spool(settings.spool)  # create the folder, or fail now
    if monitor:  # the first process only: what a killed writer left behind was never acknowledged
        swept = spool.sweep_orphans()
        if swept:
            log.info("removed %d unfinished temporary file(s) left in the spool by a killed writer", swept)
    extra = _start_siblings(settings) if monitor and settings.listener_processes > 1 else []
    stats = ListenerStats()
    server = start_server(settings, make_on_stored(index, spool), stats,
                          reuse_port=settings.listener_processes > 1, spool=spool)
    watcher = StabilityMonitor(index, settings) if monitor else None
    if watcher is not None:
        try:
            from worker.celery_app import connect_producer

            connect_producer()
        except Exception:  # the monitor's first send connects (and retries) by itself
            log.warning("could not connect to the broker yet", exc_info=True)
        watcher.start()

    def _signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
    log.info("listener %s on %s:%d (pid %d), spool %s, quiet period %.1f s", settings.ae_title,
             settings.bind, settings.port, os.getpid(), settings.spool, settings.quiet_period)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for p in extra:
            p.terminate()  # SIGTERM: each sibling shuts down the same way
        server.shutdown()  # stops accepting new associations
        # Let running associations finish (their senders would otherwise retry everything);
        # released ones linger a while in pynetdicom and are not waited for.
        grace = time.monotonic() + SHUTDOWN_GRACE
        while _established(server) and time.monotonic() < grace:
            time.sleep(0.1)
        if watcher is not None:
            watcher.stop()
        for p in extra:
            p.join(SHUTDOWN_GRACE + 5)
        log.info("listener stopped; totals %s", stats.snapshot())
    return stats


def _established(server: Any) -> list[Any]:
    return [a for a in server.active_associations if a.is_established]


def _serve_sibling(settings_json: str) -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    serve(Settings.model_validate_json(settings_json), monitor=False)


def _start_siblings(settings: Settings) -> list[Any]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no threads or sockets inherited
    procs = []
    for _ in range(settings.listener_processes - 1):
        p = ctx.Process(target=_serve_sibling, args=(settings.model_dump_json(),), daemon=False)
        p.start()
        procs.append(p)
    return procs
