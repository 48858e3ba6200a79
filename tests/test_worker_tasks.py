"""The Celery tasks called in-process (no broker round trip) against a real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.index import StudyIndex
from worker.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def tasks(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import worker.tasks as tasks

    settings = Settings(redis_url=redis_url, data_dir=tmp_path, attempt_cap=2,
                        destinations=[{"name": "gone", "port": 9}])
    monkeypatch.setattr(tasks, "_settings", settings)
    monkeypatch.setattr(tasks, "_index", StudyIndex.from_url(redis_url))
    return tasks


def test_attempt_cap_fails_the_job_with_its_reason(tasks) -> None:
    idx = tasks.index()
    idx.record_instance("3.3", "3.3.1", "a", Path("/s"), now=1.0)
    assert idx.claim("3.3", quiet=0, now=2.0) == 1
    for _ in range(2):  # two workers died mid-analysis
        idx.start_attempt("3.3", 1)
    out = tasks.analyze_study("3.3", 1)
    assert out["state"] == "failed"
    job = idx.job("3.3", 1)
    assert job["state"] == "failed" and "gave up after 2 attempts" in job["reason"]
    assert idx.study("3.3")["state"] == "failed"
    assert tasks.analyze_study("3.3", 1) == {"state": "failed"}  # redelivered: nothing to redo


def test_superseded_revision_is_skipped(tasks) -> None:
    idx = tasks.index()
    idx.record_instance("8.8", "8.8.1", "a", Path("/s"), now=1.0)
    idx.claim("8.8", quiet=0, now=2.0)
    idx.record_instance("8.8", "8.8.2", "b", Path("/s"), now=3.0)
    idx.claim("8.8", quiet=0, now=4.0)
    assert tasks.analyze_study("8.8", 1) == {"state": "superseded"}
    assert idx.job("8.8", 1)["state"] == "superseded"
    assert int(idx.job("8.8", 1)["attempts"]) == 0


def test_unknown_destination_and_missing_file_are_dead_lettered(tasks, tmp_path: Path) -> None:
    idx = tasks.index()
    idx.record_instance("2.9", "2.9.1", "a", Path("/s"), now=1.0)
    idx.claim("2.9", quiet=0, now=2.0)
    assert tasks.export_object("2.9", 1, str(tmp_path / "x.dcm"), "elsewhere", 1e12)["state"] == "dead"
    assert tasks.export_object("2.9", 1, str(tmp_path / "x.dcm"), "gone", 1e12)["state"] == "dead"
    reasons = sorted(d.reason for d in idx.dead_letters())
    assert "not configured" in reasons[1] and "no longer in the outbox" in reasons[0]
    assert idx.job("2.9", 1)["state"] == "export_failed"
