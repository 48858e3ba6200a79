"""Bad input gets a status or a reason, and the daemon keeps serving the next study."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import storescu, wait_for
from tests.integration.studies import (
    demo_study,
    discus_objects,
    garbage_file,
    result_of,
    rewrite,
    text_sr_study,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _head(ds) -> None:
    ds.BodyPartExamined = "HEAD"
    ds.SeriesDescription = "AX T2 BRAIN"
    ds.StudyDescription = "MR BRAIN"


def _no_geometry(ds) -> None:
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
               "SliceLocation", "SliceThickness", "FrameOfReferenceUID"):
        if kw in ds:
            delattr(ds, kw)


def test_bad_input_gets_a_reason_and_service_goes_on(tmp_path: Path, orthanc, discus,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom import AE, _config

    # send the file's bytes as they are, without parsing them first
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    d = discus(orthanc)
    listener = d.start_listener()
    worker = d.start_worker()
    _, mr = demo_study(tmp_path / "mr", "MR", seed=41)

    # 1. an unparsable dataset: refused with 0xC210 (cannot understand), nothing spooled
    bad = garbage_file(tmp_path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", d.port, ae_title=d.ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(bad)
    assoc.release()
    assert status.Status == 0xC210

    # 2. a non-image SOP class alone in its study; 3. a head MR study; 4. no geometry
    cases = {
        "non-image": text_sr_study(tmp_path / "text"),
        "head": rewrite(mr, tmp_path / "head", _head, "head"),
        "no-geometry": rewrite(mr, tmp_path / "nogeo", _no_geometry, "nogeo"),
    }
    for name, (uid, files) in cases.items():
        assert storescu(d.port, files).returncode == 0, name
    idx = d.index()
    for name, (uid, _) in cases.items():
        job = wait_for(lambda: (j := idx.job(uid, 1)).get("state") in ("done", "failed") and j,
                       180, f"the {name} study to be settled")
        result = result_of(d.outbox, uid)
        assert result.status.value == "not_performed", (name, result.reason)
        assert result.reason, name
        assert job.get("reason") == result.reason
        assert idx.study(uid).get("reason") == result.reason
        assert job["state"] == "done", (name, job)  # the "not performed" SR went out

    # the listener and the worker are still serving: the next study gets its result
    assert listener.alive() and worker.alive()
    uid, files = demo_study(tmp_path / "next", "MR", seed=42)
    assert storescu(d.port, files).returncode == 0
    wait_for(lambda: idx.job(uid, 1).get("state") == "done", 180, "the next study's result")
    assert discus_objects(orthanc, uid)
    status_json = d.cli("status", "--json").stdout
    assert cases["head"][0] in status_json and "not" in status_json
