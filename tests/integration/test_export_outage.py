"""The PACS goes away during export: retried until it is back, or dead-lettered and replayed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import storescu, wait_for
from tests.integration.studies import demo_study, discus_objects

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _send_while_pacs_down(tmp_path: Path, orthanc, discus, seed: int, **settings):
    """Listener and worker up, Orthanc stopped, a study sent: (discus, study UID)."""
    d = discus(orthanc, export_backoff_base=0.5, **settings)
    d.start_listener()
    d.start_worker()
    study_uid, files = demo_study(tmp_path / "study", "MR", seed=seed)
    orthanc.stop()
    assert storescu(d.port, files).returncode == 0
    return d, study_uid


def test_result_arrives_after_orthanc_comes_back(tmp_path: Path, orthanc, discus) -> None:
    try:
        d, study_uid = _send_while_pacs_down(tmp_path, orthanc, discus, 31,
                                             export_deadline=120.0, export_backoff_max=2.0)
        idx = d.index()
        wait_for(lambda: idx.job(study_uid, 1).get("state") == "exporting", 180,
                 "the analysis to finish")
        # retries fail while the PACS is down
        wait_for(lambda: "retry" in d.daemons[1].log.read_text(), 30, "an export retry")
        assert idx.job(study_uid, 1)["state"] == "exporting"
    finally:
        orthanc.start()
    job = wait_for(lambda: (j := idx.job(study_uid, 1)).get("state") == "done" and j, 60,
                   "delivery after the PACS is back")
    assert idx.dead_letters() == []
    assert len(discus_objects(orthanc, study_uid)) == int(job["objects"])


def test_past_deadline_dead_letter_then_replay_delivers(tmp_path: Path, orthanc, discus) -> None:
    try:
        d, study_uid = _send_while_pacs_down(tmp_path, orthanc, discus, 32,
                                             export_deadline=3.0, export_backoff_max=1.0)
        idx = d.index()
        job = wait_for(lambda: (j := idx.job(study_uid, 1)).get("state") == "export_failed"
                       and int(j.get("exports_dead", 0)) == int(j["exports_expected"]) and j,
                       180, "every object to be dead-lettered")
        dead = idx.dead_letters()
        assert len(dead) == int(job["objects"])
        assert all("deadline" in x.reason for x in dead)
        listed = d.cli("deadletter", "list", "--json").stdout
        assert all(x.id in listed for x in dead)
    finally:
        orthanc.start()
    assert discus_objects(orthanc, study_uid) == []
    out = d.cli("deadletter", "replay").stdout
    assert out.count("replaying") == len(dead)
    wait_for(lambda: idx.job(study_uid, 1).get("state") == "done", 60, "the replayed exports")
    assert idx.dead_letters() == []
    assert len(discus_objects(orthanc, study_uid)) == len(dead)
