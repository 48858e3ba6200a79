"""A study in by storescu, the SR and SC back in Orthanc: real Redis, Orthanc, DCMTK, daemons."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from tests.conftest import storescu, wait_for
from tests.integration.studies import demo_study, discus_objects, is_sr, result_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_storescu_study_comes_back_as_valid_sr_and_sc(tmp_path: Path, orthanc, discus) -> None:
    from dicom_io.validate import dciodvfy

    d = discus(orthanc, results_url=orthanc.dicomweb_url)  # `discus results` reads from the configured PACS
    d.start_listener()
    d.start_worker()
    study_uid, files = demo_study(tmp_path / "study", "MR", seed=11)
    sent = storescu(d.port, files)
    assert sent.returncode == 0, sent.stderr

    job = wait_for(lambda: (j := d.index().job(study_uid, 1)).get("state") == "done" and j,
                   180, "the job to be delivered")
    objects = discus_objects(orthanc, study_uid)
    assert len(objects) == int(job["objects"]) >= 1
    srs = [o for o in objects if is_sr(o)]
    assert len(srs) == 1, objects
    # every object is in the study it was computed for, SR and SC alike
    assert {o["StudyInstanceUID"] for o in objects} == {study_uid}
    result = result_of(d.outbox, study_uid)
    if result.status.value == "analysed" and result.findings:
        assert len(objects) > 1, "an analysed study with findings brings SC images too"
    for o in objects:
        path = orthanc.download(o["OrthancID"], tmp_path / f"{o['SOPInstanceUID']}.dcm")
        report = dciodvfy(path)
        assert report.ok, f"{o['SOPClassUID']}: {report.errors}"
    # what an operator sees: the objects and the findings read back from the SR
    shown = d.cli("results", study_uid).stdout
    assert srs[0]["SOPInstanceUID"] in shown
    assert "Findings in the SR" in shown and f"{len(result.findings)} entries" in shown
    assert f"status: {result.status.value}" in shown
    assert f"SR revision 1 ({srs[0]['SOPInstanceUID']})" in shown
    for analysis in result.not_run:  # what was withheld, read from the SR itself
        assert f"Not reported: {analysis}:" in shown
    accession = pydicom.dcmread(files[0], stop_before_pixels=True).AccessionNumber
    by_accession = d.cli("results", str(accession), "--accession").stdout
    assert f"accession {accession}: study {study_uid}" in by_accession and srs[0]["SOPInstanceUID"] in by_accession


def test_several_associations_and_identical_resend_give_one_result(tmp_path: Path, orthanc,
                                                                   discus) -> None:
    d = discus(orthanc, quiet_period=2.0)  # the gap between associations stays under it
    d.start_listener()
    d.start_worker()
    study_uid, files = demo_study(tmp_path / "study", "MR", seed=12)
    held_back, files = files[-1], files[:-1]
    half = len(files) // 2
    for part in (files[:half], files[half:]):  # two associations within the quiet period
        assert storescu(d.port, part).returncode == 0
    wait_for(lambda: d.index().job(study_uid, 1).get("state") == "done", 180, "the result")
    first = {o["SOPInstanceUID"] for o in discus_objects(orthanc, study_uid)}

    assert storescu(d.port, files).returncode == 0  # identical re-send
    time.sleep(d.settings["quiet_period"] * 2 + 1)  # well past the quiet period
    idx = d.index()
    assert idx.latest_revision(study_uid) == 1
    assert len(idx.jobs_of(study_uid)) == 1
    assert idx.quiet_candidates(0) == []
    assert {o["SOPInstanceUID"] for o in discus_objects(orthanc, study_uid)} == first
    assert int(idx.study(study_uid)["instances"]) == len(files)

    # a new instance after the analysis: revision 2, whose SR joins (and supersedes) the first
    assert storescu(d.port, [held_back]).returncode == 0
    wait_for(lambda: idx.job(study_uid, 2).get("state") == "done", 180, "revision 2")
    assert len(idx.jobs_of(study_uid)) == 2
    srs = [o for o in discus_objects(orthanc, study_uid) if is_sr(o)]
    assert len(srs) == 2
    new_sr = next(o for o in srs if o["SOPInstanceUID"] not in first)
    ds = pydicom.dcmread(orthanc.download(new_sr["OrthancID"], tmp_path / "sr2.dcm"))
    predecessors = [ref.ReferencedSOPInstanceUID
                    for study in ds.PredecessorDocumentsSequence
                    for series in study.ReferencedSeriesSequence
                    for ref in series.ReferencedSOPSequence]
    assert predecessors == [o["SOPInstanceUID"] for o in srs if o["SOPInstanceUID"] in first]
    assert int(idx.study(study_uid)["instances"]) == len(files) + 1


def test_dicomweb_destination_gets_the_result_by_stow(tmp_path: Path, orthanc, discus) -> None:
    d = discus(orthanc, destinations=[{"name": "web", "kind": "dicomweb",
                                       "url": orthanc.dicomweb_url}])
    d.start_listener()
    d.start_worker()
    study_uid, files = demo_study(tmp_path / "study", "DX", seed=13)
    sent = d.cli("send", str(tmp_path / "study"), "--port", str(d.port))  # our own C-STORE client
    assert f"sent {len(files)} of {len(files)} files" in sent.stdout
    job = wait_for(lambda: (j := d.index().job(study_uid, 1)).get("state") == "done" and j,
                   180, "the result over STOW-RS")
    objects = discus_objects(orthanc, study_uid)
    assert len(objects) == int(job["objects"]) >= 1
    assert len([o for o in objects if is_sr(o)]) == 1


def test_own_results_sent_back_are_kept_and_never_analysed(tmp_path: Path, orthanc, discus) -> None:
    """A PACS routing the whole study sends Discus's SR and SC back: Success, on disk, no new revision."""
    d = discus(orthanc, quiet_period=1.0)
    d.start_listener()
    d.start_worker()
    study_uid, files = demo_study(tmp_path / "study", "MR", seed=13)
    assert storescu(d.port, files).returncode == 0
    wait_for(lambda: d.index().job(study_uid, 1).get("state") == "done", 180, "the result")
    ours = [orthanc.download(o["OrthancID"], tmp_path / f"back-{i}.dcm")
            for i, o in enumerate(discus_objects(orthanc, study_uid))]
    assert ours
    sent = storescu(d.port, [*ours, files[0]], required_only=True)  # the results and one image already analysed
    assert sent.returncode == 0, sent.stderr  # answered Success
    time.sleep(d.settings["quiet_period"] * 3 + 2)
    idx = d.index()
    assert idx.latest_revision(study_uid) == 1 and len(idx.jobs_of(study_uid)) == 1
    assert int(idx.study(study_uid)["instances"]) == len(files)
    kept = {p.name for p in (d.spool / "returned" / study_uid).glob("*.dcm")}
    want = {f"{pydicom.dcmread(p).SOPInstanceUID}.dcm" for p in ours}
    assert kept == want, (sorted(want - kept), sent.stderr[-2000:])
    assert not any(p.name in kept for p in (d.spool / study_uid).rglob("*.dcm"))
