"""The study index on a real Redis: one claim per (study, revision), re-sends, exports, dead letters."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from worker.errors import DeadLetterError, JobNotFoundError
from worker.index import StudyIndex, dataset_digest

pytestmark = pytest.mark.integration


@pytest.fixture
def index(redis_url: str) -> StudyIndex:
    return StudyIndex.from_url(redis_url)


def test_quiet_study_is_claimed_once_and_identical_resend_changes_nothing(index: StudyIndex) -> None:
    folder = Path("/spool/1.2.3")
    assert index.record_instance("1.2.3", "1.2.3.1", "a", folder, now=100.0)
    assert index.record_instance("1.2.3", "1.2.3.2", "b", folder, now=101.0)
    assert index.quiet_candidates(quiet=5, now=105.0) == []
    assert index.claim("1.2.3", quiet=5, now=105.0) == -1  # not quiet yet
    assert index.quiet_candidates(quiet=5, now=106.0) == ["1.2.3"]
    assert index.claim("1.2.3", quiet=5, now=106.0) == 1
    assert index.claim("1.2.3", quiet=5, now=107.0) == 0
    assert index.job("1.2.3", 1)["state"] == "queued"
    # the same instance again, same content: nothing to do
    assert not index.record_instance("1.2.3", "1.2.3.1", "a", folder, now=200.0)
    assert index.quiet_candidates(quiet=5, now=300.0) == []
    # changed content of a known instance, then a new one: revision 2
    assert index.record_instance("1.2.3", "1.2.3.1", "a2", folder, now=300.0)
    assert index.record_instance("1.2.3", "1.2.3.3", "c", folder, now=300.0)
    assert index.claim("1.2.3", quiet=5, now=310.0) == 2
    assert index.study("1.2.3")["instances"] == "3"
    assert index.claim("1.2.3", quiet=5, now=320.0, force=True) == 3


def test_concurrent_claims_give_each_revision_to_one_caller(index: StudyIndex) -> None:
    index.record_instance("9.9", "9.9.1", "x", Path("/s"), now=1.0)
    got: list[int] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        got.append(index.claim("9.9", quiet=1, now=10.0))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [0] * 7 + [1]


def test_exports_count_once_and_finish_the_job(index: StudyIndex) -> None:
    index.record_instance("5.5", "5.5.1", "x", Path("/s"), now=1.0)
    assert index.claim("5.5", quiet=0, now=2.0) == 1
    index.start_attempt("5.5", 1)
    index.expect_exports("5.5", 1, objects=2, destinations=1, now=3.0)
    assert not index.exported("5.5", 1, "pacs", "sr.dcm")
    assert not index.exported("5.5", 1, "pacs", "sr.dcm")  # redelivered: counted once
    assert index.exported("5.5", 1, "pacs", "sc.dcm", now=4.0)
    assert index.job("5.5", 1)["state"] == "done"
    assert index.purge_due(retention=10, now=13.0) == []
    assert index.purge_due(retention=10, now=15.0) == ["5.5"]
    assert index.is_settled("5.5")


def test_dead_letter_round_trip(index: StudyIndex) -> None:
    index.record_instance("7.7", "7.7.1", "x", Path("/s"), now=1.0)
    index.claim("7.7", quiet=0, now=2.0)
    dl = index.add_dead_letter("7.7", 1, "/o/sr.dcm", "pacs", "connection refused", attempts=4)
    assert [d.id for d in index.dead_letters()] == [dl.id]
    assert index.job("7.7", 1)["state"] == "export_failed"
    taken = index.take_dead_letter(dl.id)
    assert taken.path == "/o/sr.dcm" and index.dead_letters() == []
    with pytest.raises(DeadLetterError):
        index.take_dead_letter(dl.id)
    with pytest.raises(JobNotFoundError):
        index.job("7.7", 5)


def test_digest_ignores_file_meta(tmp_path: Path) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "X"
    paths = []
    for aet in ("A", "BBBBBB"):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.SourceApplicationEntityTitle = aet
        p = tmp_path / f"{aet}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    assert dataset_digest(paths[0]) == dataset_digest(paths[1])
    ds.PatientID = "Y"
    ds.save_as(tmp_path / "y.dcm", enforce_file_format=True)
    assert dataset_digest(tmp_path / "y.dcm") != dataset_digest(paths[0])
