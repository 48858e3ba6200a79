"""Stability monitor, retry policy and purge sweep, on a real Redis (no Celery needed)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from worker.export import backoff_delay, sweep_delivered
from worker.index import StudyIndex
from worker.listener import StabilityMonitor
from worker.settings import Settings


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(0)
    delays = [backoff_delay(n, base=1.0, cap=30.0, rng=rng) for n in range(8)]
    for n, d in enumerate(delays):
        full = min(30.0, 2.0**n)
        assert full / 2 <= d <= full
    assert len({round(backoff_delay(3, 1.0, 30.0), 6) for _ in range(20)}) > 1  # jittered
    assert backoff_delay(500, 1.0, 30.0) <= 30.0
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, 1.0, 30.0)


@pytest.mark.integration
def test_monitor_queues_each_quiet_study_once(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, quiet_period=5.0)
    index = StudyIndex.from_url(redis_url)
    sent: list[tuple[str, int]] = []
    monitors = [StabilityMonitor(index, settings, enqueue=lambda u, r: sent.append((u, r)) or "t")
                for _ in range(3)]  # three listeners on one Redis
    index.record_instance("1.9", "1.9.1", "a", tmp_path, now=100.0)
    assert all(m.tick(now=103.0) == [] for m in monitors)
    for m in monitors:
        m.tick(now=106.0)
    assert sent == [("1.9", 1)]
    assert index.job("1.9", 1)["task_id"] == "t"
    index.record_instance("1.9", "1.9.1", "a", tmp_path, now=200.0)  # identical re-send
    for m in monitors:
        m.tick(now=300.0)
    assert sent == [("1.9", 1)]


@pytest.mark.integration
def test_sweep_purges_delivered_studies_after_retention_only(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, retention_period=60.0)
    index = StudyIndex.from_url(redis_url)
    for uid in ("1.1", "2.2"):
        folder = settings.spool / uid / "9"
        folder.mkdir(parents=True)
        (folder / "x.dcm").write_bytes(b"x")
        (settings.outbox / uid / "1").mkdir(parents=True)
        index.record_instance(uid, f"{uid}.1", "a", folder.parent, now=0.0)
        assert index.claim(uid, quiet=0, now=1.0) == 1
        index.start_attempt(uid, 1)
        index.expect_exports(uid, 1, objects=1, destinations=1)
        index.exported(uid, 1, "pacs", "sr.dcm", now=10.0)
    index.record_instance("2.2", "2.2.2", "b", settings.spool / "2.2", now=20.0)  # new data
    assert sweep_delivered(index, settings, now=50.0) == []  # retention not over
    assert sweep_delivered(index, settings, now=100.0) == ["1.1"]
    assert not (settings.spool / "1.1").exists() and not (settings.outbox / "1.1").exists()
    assert (settings.spool / "2.2").exists()  # a new revision is on its way
    assert index.study("1.1")["purged"] == "1"


@pytest.mark.integration
def test_claim_never_queued_is_queued_later_once(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, quiet_period=1.0)
    index = StudyIndex.from_url(redis_url)
    index.record_instance("4.4", "4.4.1", "a", tmp_path, now=10.0)
    assert index.claim("4.4", quiet=1.0, now=12.0) == 1  # a monitor that died before sending
    sent: list[tuple[str, int]] = []
    monitors = [StabilityMonitor(index, settings, enqueue=lambda u, r: sent.append((u, r)) or "t")
                for _ in range(2)]
    for m in monitors:
        m.tick(now=20.0)
    assert sent == []  # too recent: its claimer may still be sending
    for m in monitors:
        m.tick(now=100.0)
    assert sent == [("4.4", 1)]
    for m in monitors:
        m.tick(now=200.0)
    assert sent == [("4.4", 1)]


@pytest.mark.integration
def test_exports_finishing_before_mark_exporting_stay_done(redis_url: str) -> None:
    index = StudyIndex.from_url(redis_url)
    index.record_instance("6.6", "6.6.1", "a", Path("/s"), now=1.0)
    index.claim("6.6", quiet=0, now=2.0)
    index.start_attempt("6.6", 1)
    index.expect_exports("6.6", 1, objects=1, destinations=1)
    assert index.job("6.6", 1)["state"] == "running"  # a lost worker: the job runs again
    index.exported("6.6", 1, "pacs", "sr.dcm")
    index.mark_exporting("6.6", 1)
    assert index.job("6.6", 1)["state"] == "done"


@pytest.mark.integration
def test_connect_producer_declares_the_analyze_queue(redis_url: str) -> None:
    import redis

    from worker.celery_app import ANALYZE_QUEUE, connect_producer, make_celery

    r = redis.Redis.from_url(redis_url)
    r.delete(f"_kombu.binding.{ANALYZE_QUEUE}")
    celery = make_celery(Settings(redis_url=redis_url))
    connect_producer(celery)
    assert r.exists(f"_kombu.binding.{ANALYZE_QUEUE}")
