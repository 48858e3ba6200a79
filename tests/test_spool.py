"""The spool writes atomically, durably, only inside its root, and de-duplicates re-sends."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dicom_io.errors import InvalidUIDError, SpoolError, SpoolFullError
from dicom_io.spool import Spool, StoreOutcomeValues, is_valid_uid, validate_uid

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "uid",
    ["", "..", "../1.2", "1.2/3", "1..2", ".1.2", "1.2.", "1.2.a", "1.2 ", "/etc/passwd", "1" * 65, None, 12],
)
def test_invalid_uids_are_refused(uid: object, tmp_path: Path) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError, match="SOPInstanceUID"):
        validate_uid(uid, "SOPInstanceUID")
    with pytest.raises(InvalidUIDError):
        Spool(tmp_path).store(STUDY, SERIES, uid, b"x")  # type: ignore[arg-type]
    assert list(tmp_path.rglob("*")) == []


def test_valid_uid_of_64_characters() -> None:
    uid = "1." + "2" * 62
    assert len(uid) == 64 and validate_uid(uid, "x") == uid


def test_layout_and_outcomes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.store(STUDY, SERIES, SOP, b"META1" + b"dataset")
    assert first.outcome is StoreOutcomeValues.NEW
    assert first.path == tmp_path / "spool" / STUDY / SERIES / f"{SOP}.dcm"
    assert first.path.read_bytes() == b"META1dataset"
    inode = first.path.stat().st_ino

    # Same dataset, different file meta (compared from offset 5): a duplicate, file untouched.
    dup = spool.store(STUDY, SERIES, SOP, b"META2" + b"dataset", compare_from=5)
    assert dup.outcome is StoreOutcomeValues.DUPLICATE
    assert first.path.read_bytes() == b"META1dataset"
    assert first.path.stat().st_ino == inode

    changed = spool.store(STUDY, SERIES, SOP, b"META1" + b"dataset v2", compare_from=5)
    assert changed.outcome is StoreOutcomeValues.CHANGED
    assert first.path.read_bytes() == b"META1dataset v2"
    assert first.path.stat().st_ino != inode  # replaced by rename, never rewritten in place

    assert spool.studies() == [STUDY]
    assert list(spool.instances(STUDY)) == [first.path]
    assert leftovers(tmp_path) == []


def test_fsyncs_file_and_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES, SOP, b"abc")
    # file + series folder after the rename + the two parents of the new study and series folders
    assert len(synced) == 4
    synced.clear()
    spool.store(STUDY, SERIES, "1.2.3.4.6", b"abc")
    assert len(synced) == 2  # file and its folder; the folders are known to exist


def test_no_fsync_when_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    Spool(tmp_path, fsync=False).store(STUDY, SERIES, SOP, b"abc")
    assert synced == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_leaves_nothing(code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES, SOP, b"old")

    def full(fd: int, data: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(SpoolFullError):
        spool.store(STUDY, SERIES, SOP, b"new content")
    with pytest.raises(SpoolFullError):
        spool.store(STUDY, SERIES, "1.2.3.4.9", b"other")
    monkeypatch.undo()
    assert spool.path_for(STUDY, SERIES, SOP).read_bytes() == b"old"
    assert not spool.path_for(STUDY, SERIES, "1.2.3.4.9").exists()
    assert leftovers(tmp_path) == []


def test_other_write_error_is_spool_error_not_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(SpoolError) as info:
        Spool(tmp_path).store(STUDY, SERIES, SOP, b"abc")
    assert not isinstance(info.value, SpoolFullError)
    monkeypatch.undo()
    assert leftovers(tmp_path) == []


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "writev", lambda fd, parts: real_write(fd, bytes(parts[0][:3])))
    spool = Spool(tmp_path)
    written = spool.store(STUDY, SERIES, SOP, b"0123456789")
    parts = spool.store(STUDY, SERIES, "1.2.3.4.6", [b"ab", b"", b"cdefg", bytearray(b"hij")], compare_from=2)
    monkeypatch.undo()
    assert written.path.read_bytes() == b"0123456789"
    assert parts.path.read_bytes() == b"abcdefghij" and parts.size == 10
    again = spool.store(STUDY, SERIES, "1.2.3.4.6", [b"XY", b"cdefghij"], compare_from=2)
    assert again.outcome is StoreOutcomeValues.DUPLICATE


def test_purged_study_is_recreated(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES, SOP, b"abc")
    assert spool.remove_study(STUDY) is True
    assert spool.remove_study(STUDY) is False
    assert spool.studies() == []
    again = spool.store(STUDY, SERIES, SOP, b"abc")
    assert again.outcome is StoreOutcomeValues.NEW and again.path.read_bytes() == b"abc"


def test_folder_removed_behind_the_cache(tmp_path: Path) -> None:
    import shutil

    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES, SOP, b"abc")
    shutil.rmtree(tmp_path / STUDY)  # e.g. an operator purging by hand
    assert spool.store(STUDY, SERIES, SOP, b"abc").path.read_bytes() == b"abc"


def test_constructor_validates(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="root"):
        Spool(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fsync"):
        Spool(tmp_path, fsync="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compare_from"):
        Spool(tmp_path).store(STUDY, SERIES, SOP, b"abc", compare_from=9)


def test_orphan_temporary_files_are_swept_young_ones_kept(tmp_path):
    """What a killed writer left (old .tmp) goes; a write in progress in another process (young .tmp) stays."""
    import os
    import time

    from dicom_io.spool import Spool

    spool = Spool(tmp_path)
    series = tmp_path / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    old = series / ".1.2.3.4.5.dcm.123.456.tmp"
    young = series / ".1.2.3.4.6.dcm.123.457.tmp"
    kept = series / "1.2.3.4.7.dcm"
    for p in (old, young, kept):
        p.write_bytes(b"x")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert spool.sweep_orphans(older_than_s=60) == 1
    assert not old.exists() and young.exists() and kept.exists()
