"""The spool: received instances on disk, written atomically and durably.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
Each file is written to a temporary name in its final directory, fsynced,
renamed over the final name and the directory fsynced, so a file either is
there complete or not at all, also after a power cut. UIDs are checked before
they become path components, so no peer can write outside the spool.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_io.errors import InvalidUIDError, SpoolError, SpoolFullError

#: A DICOM UID: dot-separated runs of digits, at most 64 characters (PS3.5 9.1).
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SUFFIX = ".dcm"
Buffer = bytes | bytearray | memoryview


#: Folder of the spool holding stored objects that are kept but not analysed.
RETURNED = "returned"


def is_valid_uid(uid: object) -> bool:
    """Whether ``uid`` is a syntactically valid DICOM UID safe to use as a file name."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None


def validate_uid(uid: object, name: str) -> str:
    """Return ``uid`` if valid, else raise.

    Parameters
    ----------
    uid : object
        The value to check.
    name : str
        The attribute it came from, named in the error.

    Raises
    ------
    InvalidUIDError
        If ``uid`` is not a string of dot-separated digits of 1 to 64 characters.
    """
    if not is_valid_uid(uid):
        shown = repr(uid)[:80]
        raise InvalidUIDError(f"{name}: not a valid DICOM UID: {shown}")
    return uid  # type: ignore[return-value]


class StoreOutcomeValues(str, enum.Enum):
    """What storing an instance did to the spool."""

    NEW = "new"  # the SOP Instance was not there before
    CHANGED = "changed"  # it was there with other content and has been replaced
    DUPLICATE = "duplicate"  # it was there with identical content; nothing written


@dataclass(frozen=True)
class SpoolWrite:
    """Where an instance went and what happened."""

    path: Path
    outcome: StoreOutcomeValues
    size: int


class Spool:
    """Durable storage of received instances under one root folder.

    Parameters
    ----------
    root : str or pathlib.Path
        The spool folder; created if absent.
    fsync : bool, optional
        Flush files and directories to stable storage before :meth:`store`
        returns (default ``True``). Only tests and benchmarks turn it off.

    Raises
    ------
    TypeError
        If ``root`` is not a path or ``fsync`` not a bool.
    SpoolError
        If ``root`` cannot be created.
    """

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root: expected a path, got {type(root).__name__}")
        if not isinstance(fsync, bool):
            raise TypeError(f"fsync: expected bool, got {type(fsync).__name__}")
        self.root = Path(root)
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"root: cannot create spool folder {self.root}: {exc}") from exc
        # Series folders known to exist durably; saves a mkdir and parent fsyncs per instance.
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def study_folder(self, study_uid: str) -> Path:
        """The folder of one study (it may not exist)."""
        return self.root / validate_uid(study_uid, "StudyInstanceUID")

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The file an instance is stored in.

        Raises
        ------
        InvalidUIDError
            If any UID is not a valid DICOM UID.
        """
        return (
            self.study_folder(study_uid)
            / validate_uid(series_uid, "SeriesInstanceUID")
            / (validate_uid(sop_uid, "SOPInstanceUID") + SUFFIX)
        )

    def store(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        data: Buffer | Sequence[Buffer],
        compare_from: int = 0,
    ) -> SpoolWrite:
        """Write one instance atomically, unless identical content is already there.

        Parameters
        ----------
        study_uid, series_uid, sop_uid : str
            UIDs of the instance, validated before use.
        data : bytes-like or sequence of bytes-like
            The whole file (preamble, file meta and dataset), or its parts in
            order (written with one ``writev``, so the caller need not join them).
        compare_from : int, optional
            Offset in ``data`` where the content compared for duplicates starts
            (the dataset after the file meta), so a re-send that differs only in
            file meta (for example the sender's AE title) is a duplicate.

        Returns
        -------
        SpoolWrite
            Path, outcome and size.

        Raises
        ------
        InvalidUIDError
            If a UID is invalid.
        SpoolFullError
            If the file system is full or over quota; nothing is left behind.
        SpoolError
            On any other failure to write; nothing is left behind.
        """
        parts = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) else [
            memoryview(p) for p in data
        ]
        size = sum(p.nbytes for p in parts)
        if not 0 <= compare_from <= size:
            raise ValueError(f"compare_from: {compare_from} outside 0..{size}")
        path = self.path_for(study_uid, series_uid, sop_uid)
        try:
            outcome = StoreOutcomeValues.NEW
            if path.exists():
                if _ends_with(path, _tail(parts, compare_from)):
                    return SpoolWrite(path, StoreOutcomeValues.DUPLICATE, path.stat().st_size)
                outcome = StoreOutcomeValues.CHANGED
            self._ensure_dir(path.parent)
            try:
                self._write_atomic(path, parts)
            except FileNotFoundError:
                # The folder was purged behind the cache's back: make it again, once.
                with self._dirs_lock:
                    self._known_dirs.discard(path.parent)
                self._ensure_dir(path.parent)
                self._write_atomic(path, parts)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFullError(f"spool full writing {path.name}: {exc.strerror}") from exc
            raise SpoolError(f"cannot write {path.name}: {exc}") from exc
        return SpoolWrite(path, outcome, size)

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        created = []
        d = folder
        while not d.exists():
            created.append(d)
            d = d.parent
        folder.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            # A new folder's entry lives in its parent: flush each parent of a created one.
            for c in created:
                _fsync_dir(c.parent)
        with self._dirs_lock:
            self._known_dirs.add(folder)

    def _write_atomic(self, path: Path, parts: list[memoryview]) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            try:
                pending = [p.cast("B") for p in parts if p.nbytes]
                while pending:
                    n = os.writev(fd, pending)
                    # A short write: drop what went out and go on from there.
                    while pending and n >= pending[0].nbytes:
                        n -= pending[0].nbytes
                        pending.pop(0)
                    if pending and n:
                        pending[0] = pending[0][n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if self.fsync:
            _fsync_dir(path.parent)

    def set_aside(self, path: str | os.PathLike[str], study_uid: str) -> Path:
        """Move a stored file out of its study's input into ``<root>/returned/<study>/``; returns the new path.

        For objects that must be kept (their C-STORE is answered Success) but never
        analysed, such as Discus's own results sent back by the PACS. The move is a
        rename within the spool's file system, and both folders are fsynced.

        Raises
        ------
        SpoolError
            If the file cannot be moved.
        """
        src = Path(path)
        dest_dir = self.root / RETURNED / validate_uid(study_uid, "StudyInstanceUID")
        try:
            self._ensure_dir(dest_dir)
            dest = dest_dir / src.name
            os.replace(src, dest)
            if self.fsync:
                _fsync_dir(dest_dir)
                _fsync_dir(src.parent)
        except OSError as exc:
            raise SpoolError(f"cannot set aside {src.name}: {exc}") from exc
        return dest

    def sweep_orphans(self, older_than_s: float = 60.0) -> int:
        """Delete temporary files a killed writer left behind; return how many.

        Only files older than ``older_than_s`` go: another listener process sharing the spool
        may be writing a younger one right now (a write takes milliseconds). Nothing was
        acknowledged for these files (Success is answered only after the rename).
        """
        import time

        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in self.root.glob("*/*/.*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
        return removed

    def studies(self) -> list[str]:
        """UIDs of the studies in the spool, sorted."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_valid_uid(p.name))

    def instances(self, study_uid: str) -> Iterator[Path]:
        """Paths of the stored instances of one study (temporary files excluded)."""
        folder = self.study_folder(study_uid)
        if folder.is_dir():
            yield from sorted(folder.glob(f"*/*{SUFFIX}"))

    def remove_study(self, study_uid: str) -> bool:
        """Delete a study's folder; return whether it existed.

        Raises
        ------
        SpoolError
            If the folder exists but cannot be removed.
        """
        folder = self.study_folder(study_uid)
        if not folder.exists():
            return False
        with self._dirs_lock:
            self._known_dirs = {d for d in self._known_dirs if folder not in d.parents}
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            raise SpoolError(f"cannot remove study folder {folder.name}: {exc}") from exc
        return True


def _tail(parts: list[memoryview], start: int) -> bytes:
    """The bytes of ``parts`` joined, from offset ``start``."""
    if parts and start == parts[0].nbytes and len(parts) == 2:
        return parts[1]  # type: ignore[return-value]  # the usual (meta, dataset) split: no copy
    return b"".join(parts)[start:]


def _ends_with(path: Path, tail: bytes | memoryview) -> bool:
    """Whether the file at ``path`` ends with the bytes ``tail``."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = memoryview(tail).nbytes
        if size < n:
            return False
        f.seek(size - n)
        return f.read() == tail


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
