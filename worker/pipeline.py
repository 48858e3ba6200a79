"""The analysis pipeline: a study folder in, a :class:`~dicom_io.results.StudyResult` out.

A plain function (the Celery task only calls it): read the headers, select the
series, load their volumes, then hand them to the MR, CT or X-ray analysis.
:func:`encode_outputs` turns the result into the SR and SC objects in the outbox.

Nothing here raises for bad input: an unusable study ends ``NOT_PERFORMED`` with
its reason, a bad series is skipped with a warning, and an analysis whose model
package is not installed is listed in ``StudyResult.not_run`` with the reason.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dicom_io.results import SeriesRoleValues, StatusValues, StudyResult
from dicom_io.selection import assign_roles, series_uses
from dicom_io.study import Series, Study
from dicom_io.volume import Volume
from worker.analysis import AnalysisOptions, Run
from worker.model_packages import ModelPackages

log = logging.getLogger(__name__)

__all__ = ["AnalysisOptions", "ModelPackages", "OutputStream", "analyze_study", "encode_outputs"]

R = SeriesRoleValues
_MR_ROLES = (R.SAG_T2, R.SAG_STIR, R.SAG_T1, R.AX_T2)
_XRAY_ROLES = (R.XRAY_AP, R.XRAY_LAT)


def _packages_for(settings: Any | None) -> ModelPackages:
    dirs = getattr(settings, "model_dirs", None) or None
    return ModelPackages.shared(dirs, device=getattr(settings, "device", None))


def _not_performed(result: StudyResult, reason: str) -> StudyResult:
    result.status = StatusValues.NOT_PERFORMED
    result.reason = reason
    result.findings.clear()
    return result


def _select(study: Study) -> None:
    """Give every series its role and reason (the declarative rules of dicom_io.selection)."""
    assign_roles(study)


def _volumes(run: Run, series: Series) -> list[Volume]:
    """The stacks of one series; an unreadable series is skipped with a warning."""
    from dicom_io.volumes import load_volumes

    label = f"series {series.series_instance_uid} ({series.description or series.role.value})"
    with run.stage("volumes"):
        try:
            vols = load_volumes(series)
        except Exception as exc:  # bad pixels or geometry: skip the series, keep the study
            run.warn(f"{label} skipped: {type(exc).__name__}: {exc}")
            return []
    return list(vols)


def _first(run: Run, study: Study, role: SeriesRoleValues) -> tuple[Volume | None, Series | None]:
    """The first series of ``role`` whose volume loads (largest stack of it)."""
    for s in (s for s in study.series if s.role is role):
        vols = _volumes(run, s)
        if vols:
            return max(vols, key=lambda v: v.array.shape[0]), s
    return None, None


def analyze_study(
    study_folder: Path,
    revision: int,
    *,
    packages: ModelPackages | None = None,
    settings: Any | None = None,
) -> StudyResult:
    """Analyse one received study.

    Parameters
    ----------
    study_folder
        Folder of the study's instances (``<spool>/<study>/``, any depth).
    revision
        Revision of the study this analysis is for (>= 1).
    packages
        Loaded model packages; default: the process-wide ones from
        ``settings.model_dirs`` (or ``models/packages``).
    settings
        Any object; attributes named like :class:`AnalysisOptions` fields
        override the defaults, ``model_dirs`` and ``device`` choose packages.

    Returns
    -------
    StudyResult
        ``ANALYSED`` with levels, findings, warnings, ``not_run`` and timings,
        or ``NOT_PERFORMED`` with the reason.

    Raises
    ------
    ValueError
        If ``revision`` < 1 or the options in ``settings`` are invalid.
    TypeError
        If ``study_folder`` is not a path.
    """
    if not isinstance(study_folder, (str, os.PathLike)):
        raise TypeError(f"study_folder: expected a path, got {type(study_folder).__name__}")
    if revision < 1:
        raise ValueError(f"revision: must be >= 1, got {revision!r}")
    study_folder = Path(study_folder)
    options = AnalysisOptions.from_settings(settings)
    t0 = time.perf_counter()
    result = StudyResult(study_instance_uid=study_folder.name, revision=revision)
    run = Run(result, packages if packages is not None else _packages_for(settings), options)
    try:
        _analyze(run, study_folder)
    except Exception as exc:  # the contract: a study never crashes the worker
        log.exception("analysis of %s failed", study_folder)
        _not_performed(result, f"analysis failed: {type(exc).__name__}: {exc}")
    result.timings["total"] = time.perf_counter() - t0
    return result


def _analyze(run: Run, folder: Path) -> None:
    from dicom_io.headers import load_study

    result = run.result
    if not folder.is_dir():
        _not_performed(result, f"study folder {folder} does not exist")
        return
    with run.stage("load"):
        study = load_study(folder)
    if study.study_instance_uid:
        result.study_instance_uid = study.study_instance_uid
    for path, why in study.unreadable:
        run.warn(f"unreadable file {Path(path).name} skipped: {why}")
    if not study.series:
        _not_performed(result, "no readable DICOM image in the study")
        return
    if len(study.patient_identities) > 1:
        # two patients under one Study Instance UID: one report would mix their images
        _not_performed(result, f"the study's instances disagree on patient identity (PatientID/PatientName: "
                               f"{len(study.patient_identities)} different pairs); not analysed")
        return
    with run.stage("select"):
        _select(study)
    result.series = series_uses(study)
    roles = {s.role for s in study.series}
    if roles & set(_MR_ROLES):
        result.modality = "MR"
        _run_mr(run, study)
    elif R.CT_AXIAL in roles:
        result.modality = "CT"
        _run_ct(run, study)
    elif roles & set(_XRAY_ROLES):
        result.modality = next(s.modality for s in study.series if s.role in _XRAY_ROLES) or "DX"
        _run_xray(run, study)
    else:
        seen = "; ".join(
            f"{s.modality} {s.description!r}: {s.role_reason}" for s in study.series
        )
        _not_performed(result, f"no usable lumbar spine series (saw {seen})")


def _run_mr(run: Run, study: Study) -> None:
    from worker.analysis_mr import analyze_mr

    sag_t2, _ = _first(run, study, R.SAG_T2)
    label = "sagittal T2"
    if sag_t2 is None:
        sag_t2, _ = _first(run, study, R.SAG_STIR)
        label = "sagittal STIR"
    sag_t1, _ = _first(run, study, R.SAG_T1)
    axials = [v for s in study.series if s.role is R.AX_T2 for v in _volumes(run, s)]
    if sag_t2 is None and sag_t1 is None:
        _not_performed(run.result, "no usable sagittal series: levels cannot be located")
        return
    analyze_mr(run, sag_t2, sag_t1, axials, sag_t2_label=label)


def _run_ct(run: Run, study: Study) -> None:
    from worker.analysis_ct import analyze_ct

    axial, _ = _first(run, study, R.CT_AXIAL)
    if axial is None or axial.array.shape[0] < 2:
        _not_performed(run.result, "no usable axial CT stack")
        return
    analyze_ct(run, axial)


def _projections(run: Run, study: Study, series: Series) -> list[Volume]:
    """Each radiograph of a series as a one-image volume (no patient geometry: pixel spacing only)."""
    from dicom_io.volumes import load_projection

    out = []
    for inst in series.instances:
        with run.stage("volumes"):
            try:
                image, (row_mm, col_mm) = load_projection(inst.path)
            except Exception as exc:  # one bad radiograph must not end the study
                run.warn(f"image {inst.sop_instance_uid} skipped: {type(exc).__name__}: {exc}")
                continue
        affine = np.diag([col_mm, row_mm, 1.0, 1.0])
        out.append(
            Volume(np.asarray(image, np.float32)[None], affine, [inst.sop_instance_uid],
                   series.series_instance_uid, study.study_instance_uid, inst.sop_class_uid)
        )
    return out


def _run_xray(run: Run, study: Study) -> None:
    from worker.analysis_xray import analyze_xray

    images = [v for s in study.series if s.role in _XRAY_ROLES for v in _projections(run, study, s)]
    if not images:
        _not_performed(run.result, "no usable lumbar X-ray image")
        return
    analyze_xray(run, images, {s.series_instance_uid for s in study.series if s.role is R.XRAY_LAT})


def _write_atomic(ds: Any, folder: Path) -> Path:
    """Write a dataset as ``<SOPInstanceUID>.dcm`` in ``folder``: temp file, fsync, rename."""
    final = folder / f"{ds.SOPInstanceUID}.dcm"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def _sources(study_folder: Path) -> dict[str, Any]:
    """The study's instances by SOP Instance UID, headers read and pixels deferred."""
    import pydicom

    sources = {}
    for path in sorted(Path(study_folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            # Large values (pixel data) are read only if the encoder touches them.
            ds = pydicom.dcmread(path, defer_size="64 KB")
        except Exception:  # not DICOM or unreadable: already reported by the analysis
            continue
        uid = getattr(ds, "SOPInstanceUID", None)
        if uid:
            sources[str(uid)] = ds
    return sources


class OutputStream:
    """The SR and SC objects of a result, written into the outbox one at a time.

    ``len()`` is known before anything is encoded, so a caller can announce how many
    deliveries finish the job and then hand each file to the export queue as soon as
    it is on disk (the SR first, while the heatmaps are still being made). Iterating
    encodes and writes each object and yields its path.
    """

    def __init__(self, result: StudyResult, study_folder: Path, outbox: Path, *,
                 predecessor: Path | None = None, not_performed_sr: bool = True) -> None:
        import pydicom

        self.result = result
        self.outbox = Path(outbox)
        self.skip = result.status is StatusValues.NOT_PERFORMED and not not_performed_sr
        self.sources = {} if self.skip else _sources(study_folder)
        self._repair_headers()
        self.predecessor = pydicom.dcmread(predecessor) if predecessor is not None and not self.skip else None

    def _repair_headers(self) -> None:
        """Copy only valid patient/study attributes into the results; say which were left empty."""
        from dicom_io.headers import repair_header

        changed: set[str] = set()
        for ds in self.sources.values():
            changed.update(repair_header(ds))
        if changed:
            note = ("source header attributes missing or invalid, left empty in the results: "
                    + ", ".join(sorted(changed)))
            if note not in self.result.warnings:
                self.result.warnings.append(note)

    def __len__(self) -> int:
        from dicom_io.sc import count_outputs

        return 0 if self.skip else count_outputs(self.result, self.sources)

    def __iter__(self) -> Iterator[Path]:
        from dicom_io.sc import iter_outputs

        if self.skip:
            return
        self.outbox.mkdir(parents=True, exist_ok=True)
        for ds in iter_outputs(self.result, self.sources, predecessor=self.predecessor):
            yield _write_atomic(ds, self.outbox)


def encode_outputs(
    result: StudyResult,
    study_folder: Path,
    outbox: Path,
    *,
    predecessor: Path | None = None,
    not_performed_sr: bool = True,
) -> list[Path]:
    """Encode the SR and SC objects of ``result`` and write them into ``outbox``.

    Parameters
    ----------
    result
        The analysis result.
    study_folder
        The study's instances (the SR/SC reference them and copy patient/study
        attributes from them).
    outbox
        Folder to write into (created if absent).
    predecessor
        The SR file of the previous revision, which the new SR supersedes.
    not_performed_sr
        Whether a ``NOT_PERFORMED`` result gets an "analysis not performed" SR.

    Returns
    -------
    list of Path
        Files written, named ``<SOPInstanceUID>.dcm`` (deterministic UIDs, so
        a retried task rewrites the same names); SR first. :class:`OutputStream`
        gives them one at a time.
    """
    return list(OutputStream(result, study_folder, outbox, predecessor=predecessor,
                             not_performed_sr=not_performed_sr))
