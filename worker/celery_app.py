"""The Celery application: Redis as broker and result store, queues ``analyze`` and ``export``.

``celery -A worker.celery_app worker`` (or ``discus worker``) uses the module-level
:data:`app`, configured from :class:`~worker.settings.Settings` at import.

Reliability settings and why:

- ``task_acks_late`` and ``task_reject_on_worker_lost``: a task is acknowledged only when
  it finished, so a worker killed mid-analysis leaves its message to be delivered again.
- ``worker_prefetch_multiplier = 1``: a busy analysis process holds no other study hostage.
- ``visibility_timeout``: after it, a message whose worker vanished (SIGKILL of the whole
  process group, power loss) is restored to its queue; it exceeds every time limit so a
  live task is never doubled.
- Analysis runs in a prefork child (``--concurrency 1`` per GPU): models, and CUDA with
  them, are initialised in the child by ``worker_process_init``, never in the forked parent,
  and the hard time limit can kill a stuck child.
"""

from __future__ import annotations

import logging
import os

from celery import Celery, signals
from kombu import Exchange, Queue

from worker.settings import Settings

ANALYZE_QUEUE = "analyze"
EXPORT_QUEUE = "export"
ANALYZE_TASK = "discus.analyze_study"
EXPORT_TASK = "discus.export_object"
#: Set by ``discus worker`` to the queues it consumes (comma-separated).
QUEUES_ENV = "DISCUS_WORKER_QUEUES"
#: Logged by an analysis process once it can take a study without start-up costs.
READY_LINE = "analysis process ready"

log = logging.getLogger(__name__)


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: :meth:`Settings.load`)."""
    settings = Settings.load() if settings is None else settings
    app = Celery("discus", broker=settings.redis_url, backend=settings.redis_url,
                 include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # One exchange and routing key per queue, so a message lands in exactly one queue.
        task_queues=tuple(Queue(q, Exchange(q, type="direct"), routing_key=q)
                          for q in (ANALYZE_QUEUE, EXPORT_QUEUE)),
        task_default_queue=EXPORT_QUEUE,
        task_routes={ANALYZE_TASK: {"queue": ANALYZE_QUEUE}, EXPORT_TASK: {"queue": EXPORT_QUEUE}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,
            # look for abandoned messages often enough to honour a short visibility timeout
            "unacked_restore_interval": max(1.0, min(10.0, settings.broker_visibility_timeout / 4)),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": settings.broker_visibility_timeout},
    )
    app.discus_settings = settings  # type: ignore[attr-defined]
    return app


app = make_celery()


def connect_producer(celery: Celery | None = None, queue: str = ANALYZE_QUEUE) -> None:
    """Open the broker connection and declare ``queue`` before the first message is sent.

    A process that sends tasks (the listener's monitor) otherwise pays for both, about
    0.1 s, in the first study's queue wait. ``celery`` defaults to :data:`app`.
    """
    celery = app if celery is None else celery
    with celery.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
        celery.amqp.queues[queue].bind(producer.channel).declare()


@signals.worker_process_init.connect
def _warm_models(**_: object) -> None:
    # In the prefork child, before the first task: load the model packages once, so CUDA
    # (if any) is initialised here and never in the parent that forks.
    queues = os.environ.get(QUEUES_ENV, ANALYZE_QUEUE).split(",")
    if EXPORT_QUEUE in queues:
        import dicom_io.scu  # noqa: F401  (the first export would spend ~60 ms importing it)
    if ANALYZE_QUEUE not in queues:
        return  # an export-only worker needs no models
    settings: Settings = app.discus_settings  # type: ignore[attr-defined]
    try:
        import worker.pipeline  # noqa: F401  (imports torch once, before the first study)
        from worker.model_packages import ModelPackages

        ModelPackages.shared(settings.model_dirs or None, device=settings.device)
    except Exception:  # a missing package is reported per study by the pipeline
        log.exception("model packages could not be loaded at start; the pipeline will report why")
    try:
        from dicom_io.outputs import warm_up

        warm_up()  # the SR/SC encoders' first use costs about half a second
    except Exception:  # only the first study's encoding is slower for it
        log.exception("warming up the SR/SC encoders failed")
    log.info("%s (pid %d): models loaded, SR/SC encoders warm", READY_LINE, os.getpid())
