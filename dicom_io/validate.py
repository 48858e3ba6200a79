"""Check written objects with the standard's own tools: dicom3tools ``dciodvfy`` and DCMTK ``dsrdump``.

Both are external programs (Debian packages ``dicom3tools`` and ``dcmtk``). A
dataset is written to a temporary Part 10 file first, so callers can pass either a
path or an in-memory dataset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_io.errors import ValidationToolError

#: Seconds a tool may run before it is considered hung.
TOOL_TIMEOUT_S = 60.0


@dataclass
class ValidationReport:
    """What ``dciodvfy`` said about one object.

    Attributes
    ----------
    iod : str
        The IOD dciodvfy recognised (first output line, e.g. ``Comprehensive3DSR``).
    errors : list of str
        Lines starting with ``Error``.
    warnings : list of str
        Lines starting with ``Warning``.
    output : str
        The tool's full output.
    """

    iod: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        """``True`` when dciodvfy reported no errors (warnings allowed)."""
        return not self.errors


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ValidationToolError(f"{name}: not found on PATH (install dicom3tools / dcmtk)")
    return path


@contextmanager
def _as_file(path_or_ds: str | os.PathLike[str] | Dataset) -> Iterator[Path]:
    if isinstance(path_or_ds, Dataset):
        with tempfile.TemporaryDirectory(prefix="discus-validate-") as tmp:
            path = Path(tmp) / "object.dcm"
            path_or_ds.save_as(path, enforce_file_format=True)
            yield path
    elif isinstance(path_or_ds, (str, os.PathLike)):
        path = Path(path_or_ds)
        if not path.is_file():
            raise ValueError(f"path_or_ds: no such file {str(path)!r}")
        yield path
    else:
        raise TypeError(f"path_or_ds: expected a path or a pydicom Dataset, got {type(path_or_ds).__name__}")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args, capture_output=True, text=True, errors="replace", timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ValidationToolError(f"{args[0]}: no answer within {TOOL_TIMEOUT_S} s") from exc


def dciodvfy(path_or_ds: str | os.PathLike[str] | Dataset) -> ValidationReport:
    """Validate an object against its IOD with dicom3tools ``dciodvfy``.

    Parameters
    ----------
    path_or_ds : path or pydicom.Dataset
        A Part 10 file, or a dataset to write to a temporary file first.

    Returns
    -------
    ValidationReport
        Errors and warnings; ``.ok`` is ``True`` when there are no errors.

    Raises
    ------
    ValidationToolError
        If ``dciodvfy`` is missing or hangs.
    """
    exe = _tool("dciodvfy")
    with _as_file(path_or_ds) as path:
        proc = _run([exe, str(path)])
    output = (proc.stdout + proc.stderr).strip()
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    iod = lines[0] if lines and not lines[0].startswith(("Error", "Warning")) else ""
    return ValidationReport(
        iod=iod,
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )


def dsrdump(path_or_ds: str | os.PathLike[str] | Dataset) -> str:
    """Render an SR with DCMTK ``dsrdump`` and return its text.

    Parameters
    ----------
    path_or_ds : path or pydicom.Dataset
        A Part 10 SR file, or an SR dataset.

    Returns
    -------
    str
        The rendered document.

    Raises
    ------
    ValidationToolError
        If ``dsrdump`` is missing, hangs, exits non-zero or prints an error.
    """
    exe = _tool("dsrdump")
    with _as_file(path_or_ds) as path:
        proc = _run([exe, str(path)])
    problems = [
        line for line in proc.stderr.splitlines() if line.startswith(("E:", "F:"))
    ]
    if proc.returncode != 0 or problems:
        detail = "; ".join(problems) or proc.stderr.strip() or f"exit status {proc.returncode}"
        raise ValidationToolError(f"dsrdump: cannot read the SR: {detail}")
    return proc.stdout
