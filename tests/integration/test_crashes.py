"""Processes killed with SIGKILL lose nothing: the worker mid-analysis, the listener mid-stream."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest

from tests.conftest import storescu, wait_for
from tests.integration.studies import demo_study, discus_objects, is_sr

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_worker_killed_mid_analysis_result_arrives_once(tmp_path: Path, orthanc, discus) -> None:
    d = discus(orthanc)
    d.start_listener()
    worker = d.start_worker(name="doomed")
    study_uid, files = demo_study(tmp_path / "study", "MR", seed=21)
    assert storescu(d.port, files).returncode == 0

    idx = d.index()
    wait_for(lambda: idx.job(study_uid, 1).get("state") == "running", 60, "the analysis to start",
             interval=0.02)
    worker.kill9()  # the whole process group: parent and prefork child
    assert idx.job(study_uid, 1)["state"] == "running"  # killed before it finished

    d.start_worker(name="rescuer")
    # the message comes back after the broker's visibility timeout
    job = wait_for(lambda: (j := idx.job(study_uid, 1)).get("state") == "done" and j, 180,
                   "the result after the kill")
    assert int(job["attempts"]) == 2
    objects = discus_objects(orthanc, study_uid)
    assert len(objects) == int(job["objects"])
    assert len([o for o in objects if is_sr(o)]) == 1
    assert len(idx.jobs_of(study_uid)) == 1


def test_listener_killed_mid_stream_keeps_every_acknowledged_instance(tmp_path: Path,
                                                                      discus) -> None:
    from pynetdicom import AE

    d = discus()
    listener = d.start_listener()
    _, files = demo_study(tmp_path / "study", "MR", seed=22)
    datasets = [pydicom.dcmread(f) for f in files[:60]]

    kill_at = len(datasets) // 3
    acked: list[pydicom.Dataset] = []
    ae = AE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", d.port, ae_title=d.ae_title)
    assert assoc.is_established
    killer: threading.Thread | None = None
    for i, ds in enumerate(datasets):
        try:
            status = assoc.send_c_store(ds)
        except Exception:
            break
        if not status or status.Status != 0x0000:
            break
        acked.append(ds)
        if i == kill_at:  # kill right after this Success, while the sender keeps sending
            killer = threading.Thread(target=listener.kill9)
            killer.start()
    assoc.abort()
    if killer is not None:
        killer.join()
    assert not listener.alive()
    assert kill_at < len(acked) < len(datasets), "the kill must land mid-stream"
    for ds in acked:
        path = d.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert path.is_file(), f"acknowledged {ds.SOPInstanceUID} is not on disk"
        back = pydicom.dcmread(path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.PixelData == ds.PixelData
