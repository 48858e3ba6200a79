"""C-STORE and C-ECHO as a client (SCU), with failures sorted into transient and permanent.

Each file is sent in its own transfer syntax when the peer accepts it, so
compressed files travel as they are. For every SOP class the association also
proposes explicit and implicit VR little endian; a file whose own syntax is
refused is decompressed (or inflated) and sent uncompressed instead.

Failures become :class:`dicom_io.errors.ExportError` with ``transient`` set:

- transient: connection refused or timed out, association rejected
  transiently or aborted, no response, status 0xA7xx (out of resources);
- permanent: association rejected permanently, SOP class or syntax not
  accepted, unreadable file, status 0xA9xx, 0xCxxx or any other failure.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, sop_class
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_io.errors import ExportError
from dicom_io.transport import NoDelayAE

LOGGER = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
_WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class SendResult:
    """What happened to one file.

    ``status`` is the DIMSE status received (``None`` when nothing was
    received); ``error`` is ``None`` on success, warnings included.
    """

    path: Path
    sop_instance_uid: str | None
    status: int | None
    error: ExportError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def classify_status(status: int) -> bool | None:
    """Sort a C-STORE status: ``None`` for success or warning, else whether it is transient."""
    if status == 0x0000 or status in _WARNING_STATUSES:
        return None
    return (status & 0xFF00) == 0xA700


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax: UID


def _read_info(path: Path) -> _FileInfo:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    meta = ds.file_meta
    sop_class_uid = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    sop_uid = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
    tsyntax = meta.get("TransferSyntaxUID")
    if not sop_class_uid or not sop_uid or not tsyntax:
        raise ValueError("missing SOP Class UID, SOP Instance UID or Transfer Syntax UID")
    return _FileInfo(path, UID(sop_class_uid), str(sop_uid), UID(tsyntax))


def _contexts_for(infos: Sequence[_FileInfo]) -> list[PresentationContext]:
    """One context per (SOP class, own syntax) plus one uncompressed fallback per SOP class."""
    own: dict[tuple[UID, UID], None] = {}
    classes: dict[UID, None] = {}
    for info in infos:
        classes[info.sop_class_uid] = None
        if info.transfer_syntax not in _UNCOMPRESSED:
            own[(info.sop_class_uid, info.transfer_syntax)] = None
    contexts = [build_context(c, [t]) for c, t in own]
    contexts += [build_context(c, list(_UNCOMPRESSED)) for c in classes]
    return contexts


def _batches(infos: list[_FileInfo]) -> Iterable[list[_FileInfo]]:
    """Split files so that no association proposes more than 128 contexts."""
    batch: list[_FileInfo] = []
    keys: set[tuple[UID, UID | None]] = set()
    for info in infos:
        # The same keys as _contexts_for: (class, None) is the uncompressed fallback.
        new = {(info.sop_class_uid, None)}
        if info.transfer_syntax not in _UNCOMPRESSED:
            new.add((info.sop_class_uid, info.transfer_syntax))
        if batch and len(keys | new) > _MAX_CONTEXTS:
            yield batch
            batch, keys = [], set()
        batch.append(info)
        keys |= new
    if batch:
        yield batch


def _make_ae(
    calling_aet: str,
    acse_timeout: float | None,
    dimse_timeout: float | None,
    network_timeout: float | None,
    connection_timeout: float | None,
    maximum_pdu_size: int,
) -> NoDelayAE:
    ae = NoDelayAE(ae_title=calling_aet)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = connection_timeout
    ae.maximum_pdu_size = maximum_pdu_size
    return ae


def _association_error(assoc: Association, host: str, port: int) -> ExportError:
    """Why an association was not established, as an ExportError."""
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        result = getattr(rj, "result", None)
        detail = f"result {result}, source {getattr(rj, 'result_source', None)}, reason {getattr(rj, 'diagnostic', None)}"
        transient = result == 0x02
        kind = "transiently" if transient else "permanently"
        return ExportError(f"association to {host}:{port} rejected {kind} ({detail})", transient=transient)
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        names = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        return ExportError(
            f"{host}:{port} accepts none of the proposed SOP classes and syntaxes ({', '.join(names)})",
            transient=False,
        )
    # pynetdicom reports a refused or timed-out connection as an abort too.
    return ExportError(
        f"no association with {host}:{port} (connection refused, timed out or aborted)",
        transient=True,
    )


def send_files(
    paths: Iterable[str | os.PathLike[str]],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "DISCUS",
    *,
    acse_timeout: float | None = 30.0,
    dimse_timeout: float | None = 60.0,
    network_timeout: float | None = 60.0,
    connection_timeout: float | None = 10.0,
    maximum_pdu_size: int = 0,
) -> list[SendResult]:
    """C-STORE files to a peer, each in its own transfer syntax where accepted.

    Parameters
    ----------
    paths : iterable of path
        DICOM files (with file meta) to send.
    host, port : str, int
        The peer's address.
    called_aet, calling_aet : str
        The peer's AE title and ours.
    acse_timeout, dimse_timeout, network_timeout, connection_timeout : float or None
        Seconds to wait for association messages, responses, any traffic and
        the TCP connection.
    maximum_pdu_size : int
        Largest PDU we accept (0: unlimited).

    Returns
    -------
    list of SendResult
        One per path, in order. Nothing is raised for a failed file; see
        :func:`raise_for_results`.

    Raises
    ------
    TypeError, ValueError
        If an argument has the wrong type or value.
    """
    paths = [Path(p) for p in paths]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise ValueError(f"port: expected an int in 1..65535, got {port!r}")
    if not isinstance(called_aet, str) or not called_aet.strip():
        raise ValueError(f"called_aet: expected a non-empty AE title, got {called_aet!r}")
    results: dict[Path, SendResult] = {}
    infos: list[_FileInfo] = []
    for path in paths:
        try:
            infos.append(_read_info(path))
        except Exception as exc:  # unreadable input of any kind is a permanent failure
            results[path] = SendResult(
                path, None, None, ExportError(f"{path.name}: not a readable DICOM file ({exc})", transient=False)
            )
    ae = _make_ae(calling_aet, acse_timeout, dimse_timeout, network_timeout, connection_timeout, maximum_pdu_size)
    for batch in _batches(infos):
        ae.requested_contexts = _contexts_for(batch)
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            error = _association_error(assoc, host, port)
            for info in batch:
                results[info.path] = SendResult(info.path, info.sop_instance_uid, None, error)
            continue
        try:
            for info in batch:
                if not assoc.is_established:
                    error = ExportError(f"association to {host}:{port} ended early", transient=True)
                    results[info.path] = SendResult(info.path, info.sop_instance_uid, None, error)
                    continue
                results[info.path] = _send_one(assoc, info)
        finally:
            if assoc.is_established:
                assoc.release()
    sent = sum(r.ok for r in results.values())
    LOGGER.info("sent %d of %d files to %s@%s:%s", sent, len(paths), called_aet, host, port)
    return [results[p] for p in paths]


def _accepted(assoc: Association, info: _FileInfo) -> tuple[bool, bool]:
    """Whether the peer accepted (own syntax, an uncompressed syntax) for this SOP class."""
    own = uncompressed = False
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != info.sop_class_uid:
            continue
        own = own or cx.transfer_syntax[0] == info.transfer_syntax
        uncompressed = uncompressed or cx.transfer_syntax[0] in _UNCOMPRESSED
    return own, uncompressed


def _uncompressed_dataset(path: Path) -> Dataset:
    """Read a file and make it uncompressed so it fits a little endian context."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    else:
        # Deflated or big endian: pynetdicom re-encodes the decoded dataset.
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _send_one(assoc: Association, info: _FileInfo) -> SendResult:
    own, uncompressed = _accepted(assoc, info)
    if not own and not uncompressed:
        error = ExportError(
            f"{info.path.name}: peer accepted neither SOP class {info.sop_class_uid} "
            f"in {info.transfer_syntax} nor uncompressed",
            transient=False,
        )
        return SendResult(info.path, info.sop_instance_uid, None, error)
    try:
        payload: Path | Dataset = info.path if own else _uncompressed_dataset(info.path)
        rsp = assoc.send_c_store(payload)
    except Exception as exc:  # decoding or encoding the file failed: retrying will not help
        error = ExportError(f"{info.path.name}: cannot send ({type(exc).__name__}: {exc})", transient=False)
        return SendResult(info.path, info.sop_instance_uid, None, error)
    status = rsp.get("Status") if rsp is not None else None
    if status is None:
        error = ExportError(f"{info.path.name}: no C-STORE response (timeout or abort)", transient=True)
        return SendResult(info.path, info.sop_instance_uid, None, error)
    status = int(status)
    transient = classify_status(status)
    if transient is None:
        return SendResult(info.path, info.sop_instance_uid, status)
    error = ExportError(
        f"{info.path.name}: C-STORE failed with status 0x{status:04X}", transient=transient, status=status
    )
    return SendResult(info.path, info.sop_instance_uid, status, error)


def raise_for_results(results: Sequence[SendResult]) -> None:
    """Raise one :class:`ExportError` if any file failed.

    The error is transient only when every failure is transient, so a retry is
    scheduled only when it can help all the files that failed.

    Raises
    ------
    ExportError
        Summarising the failures; ``status`` is the first failure's status.
    """
    failed = [r for r in results if r.error is not None]
    if not failed:
        return
    transient = all(r.error.transient for r in failed)  # type: ignore[union-attr]
    first = failed[0].error
    raise ExportError(
        f"{len(failed)} of {len(results)} files failed; first: {first}",
        transient=transient,
        status=first.status if first is not None else None,
    )


def echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "DISCUS",
    timeout: float = 10.0,
) -> int:
    """C-ECHO a peer.

    Returns
    -------
    int
        The C-ECHO status (0x0000 for success).

    Raises
    ------
    ExportError
        If no association could be made or no response came back, classified
        as for :func:`send_files`.
    """
    ae = _make_ae(calling_aet, timeout, timeout, timeout, timeout, 0)
    ae.add_requested_context(sop_class.Verification)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise _association_error(assoc, host, port)
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    status = rsp.get("Status") if rsp is not None else None
    if status is None:
        raise ExportError(f"no C-ECHO response from {host}:{port}", transient=True)
    return int(status)
