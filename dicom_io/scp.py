"""The DICOM listener: a Storage and Verification SCP that writes to the spool.

The C-STORE handler stores what it received as received: the raw encoded
dataset with file meta, never decoded, so compressed transfer syntaxes cost
nothing extra. It answers Success only after :meth:`dicom_io.spool.Spool.store`
has fsynced the file and its folder. Statuses:

- ``0x0000`` stored, or an identical copy was already stored;
- ``0xA700`` (refused, out of resources) when the spool cannot be written (disk
  full or any other write failure) or when the ``on_stored`` callback fails;
- ``0xC210`` (cannot understand) when the dataset cannot be parsed or its UIDs
  are missing or invalid.

When ``on_stored`` raises, the file is already on disk, yet the handler answers
0xA700 rather than Success: the callback records the instance in the study
index, and an instance on disk that the index never heard of would never be
analysed. With 0xA700 the sender retries; the retry is a duplicate on disk
(nothing rewritten) and calls ``on_stored`` again, so the index catches up.

Logs carry UIDs, AE titles and counts only, never patient attributes.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom import uid as ts
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt, sop_class
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.errors import InvalidUIDError, SpoolError, SpoolFullError
from dicom_io.spool import Spool, StoreOutcomeValues, validate_uid
from dicom_io.transport import LeanAssociationServer, NoDelayAE

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210

#: Image storage SOP classes analysed or passed through.
IMAGE_STORAGE_CLASSES: tuple[str, ...] = (
    sop_class.MRImageStorage,
    sop_class.EnhancedMRImageStorage,
    sop_class.EnhancedMRColorImageStorage,
    sop_class.LegacyConvertedEnhancedMRImageStorage,
    sop_class.CTImageStorage,
    sop_class.EnhancedCTImageStorage,
    sop_class.LegacyConvertedEnhancedCTImageStorage,
    sop_class.DigitalXRayImageStorageForPresentation,
    sop_class.DigitalXRayImageStorageForProcessing,
    sop_class.ComputedRadiographyImageStorage,
    sop_class.SecondaryCaptureImageStorage,
    sop_class.MultiFrameSingleBitSecondaryCaptureImageStorage,
    sop_class.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sop_class.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sop_class.MultiFrameTrueColorSecondaryCaptureImageStorage,
)

#: Document (and segmentation) classes a PACS may route along with a study: stored, never analysed.
DOCUMENT_STORAGE_CLASSES: tuple[str, ...] = (
    sop_class.BasicTextSRStorage,
    sop_class.EnhancedSRStorage,
    sop_class.ComprehensiveSRStorage,
    sop_class.Comprehensive3DSRStorage,
    sop_class.ExtensibleSRStorage,
    sop_class.KeyObjectSelectionDocumentStorage,
    sop_class.SegmentationStorage,  # Discus's own SEG, routed back with the study
)

#: Transfer syntaxes accepted for every storage class, uncompressed ones first.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ts.ExplicitVRLittleEndian,
    ts.ImplicitVRLittleEndian,
    ts.DeflatedExplicitVRLittleEndian,
    ts.ExplicitVRBigEndian,
    ts.JPEGBaseline8Bit,
    ts.JPEGExtended12Bit,
    ts.JPEGLossless,
    ts.JPEGLosslessSV1,
    ts.JPEGLSLossless,
    ts.JPEGLSNearLossless,
    ts.JPEG2000Lossless,
    ts.JPEG2000,
    ts.HTJ2KLossless,
    ts.HTJ2KLosslessRPCL,
    ts.HTJ2K,
    ts.RLELossless,
)

# Header attributes the handler reads; everything else, pixels included, is skipped.
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]


def _check_aet(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected str, got {type(value).__name__}")
    if not 0 < len(value.strip()) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"{name}: not a valid AE title: {value!r}")
    return value.strip()


def _check_timeout(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number of seconds or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")
    return float(value)


@dataclass(frozen=True)
class ListenerConfig:
    """Everything that configures the listener's application entity.

    Parameters
    ----------
    ae_title : str
        The listener's AE title (1 to 16 characters).
    host : str
        Address to bind (``""`` or ``"0.0.0.0"`` for all IPv4 interfaces).
    port : int
        TCP port; 0 picks a free one (see the server's ``server_address``).
    allowed_calling_aets : sequence of str
        Calling AE titles accepted; empty accepts any. Others are rejected at
        association (rejected-permanent, calling AE title not recognised).
    require_called_aet : bool
        Reject associations whose called AE title is not ``ae_title``.
    max_associations : int
        Concurrent associations accepted; more are rejected transiently.
    acse_timeout, dimse_timeout, network_timeout : float or None
        Seconds to wait for association messages, DIMSE messages and any
        network traffic; ``None`` waits forever.
    maximum_pdu_size : int
        Largest PDU the listener accepts, in bytes (told to every peer at association);
        a longer one drops the connection, so one peer cannot take the process's memory.
        The default, 4 MiB, lets senders put a typical image in one PDU; 0 means unlimited.

    Raises
    ------
    TypeError, ValueError
        If a parameter has the wrong type or value; the message names it.
    """

    ae_title: str = "DISCUS"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: Sequence[str] = ()
    require_called_aet: bool = False
    max_associations: int = 10
    acse_timeout: float | None = 30.0
    dimse_timeout: float | None = 60.0
    network_timeout: float | None = 60.0
    maximum_pdu_size: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", _check_aet(self.ae_title, "ae_title"))
        if not isinstance(self.host, str):
            raise TypeError(f"host: expected str, got {type(self.host).__name__}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TypeError(f"port: expected int, got {type(self.port).__name__}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")
        if isinstance(self.allowed_calling_aets, str):
            raise TypeError("allowed_calling_aets: expected a sequence of AE titles, got a str")
        aets = tuple(_check_aet(a, "allowed_calling_aets") for a in self.allowed_calling_aets)
        object.__setattr__(self, "allowed_calling_aets", aets)
        if not isinstance(self.require_called_aet, bool):
            raise TypeError("require_called_aet: expected bool")
        if isinstance(self.max_associations, bool) or not isinstance(self.max_associations, int):
            raise TypeError(f"max_associations: expected int, got {type(self.max_associations).__name__}")
        if self.max_associations < 1:
            raise ValueError(f"max_associations: must be at least 1, got {self.max_associations}")
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            object.__setattr__(self, name, _check_timeout(getattr(self, name), name))
        if isinstance(self.maximum_pdu_size, bool) or not isinstance(self.maximum_pdu_size, int):
            raise TypeError(f"maximum_pdu_size: expected int, got {type(self.maximum_pdu_size).__name__}")
        if self.maximum_pdu_size != 0 and self.maximum_pdu_size < 4096:
            raise ValueError(f"maximum_pdu_size: 0 (unlimited) or at least 4096, got {self.maximum_pdu_size}")


@dataclass(frozen=True)
class StoredInstance:
    """One instance the listener has put on disk, as told to ``on_stored``.

    ``digest`` is the SHA-1 (hex) of the dataset bytes as received, file meta excluded:
    what :func:`worker.index.dataset_digest` computes from the stored file.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    path: Path
    size: int
    calling_ae_title: str
    outcome: StoreOutcomeValues
    digest: str = ""

    @property
    def is_new(self) -> bool:
        return self.outcome is StoreOutcomeValues.NEW

    @property
    def is_changed(self) -> bool:
        """Whether the spool's content changed (new or replaced instance)."""
        return self.outcome is not StoreOutcomeValues.DUPLICATE


OnStored = Callable[[StoredInstance], None]


@dataclass
class ListenerStats:
    """Thread-safe counters of what the listener did, for logs and status pages."""

    received: int = 0
    new: int = 0
    changed: int = 0
    duplicate: int = 0
    undecodable: int = 0
    write_failed: int = 0
    callback_failed: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, size: int = 0) -> None:
        with self._lock:
            self.received += 1
            setattr(self, name, getattr(self, name) + 1)
            self.bytes += size

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict."""
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _stop_after_series_uid(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) > 0x0020000E  # the UIDs and Modality come before (0020,000E) ends


def _read_header(stream: BytesIO, transfer_syntax: UID, meta: bytes) -> Dataset:
    """The leading attributes of a received dataset, up to SeriesInstanceUID, pixels untouched."""
    if transfer_syntax.is_deflated:
        # Deflated datasets must be inflated first; pydicom does that for a whole file.
        return dcmread(BytesIO(meta + stream.getvalue()), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    stream.seek(0)
    try:
        return read_dataset(
            stream, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
            stop_when=_stop_after_series_uid,
        )
    finally:
        stream.seek(0)


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of the file meta group (short-length VRs and OB)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information of a received instance.

    The same bytes as pynetdicom's ``Event.file_meta`` encoded by pydicom (group length,
    version, media storage SOP class and instance, transfer syntax, pynetdicom's
    implementation class UID and version name), in a fraction of the time.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid : str
        The request's Affected SOP Class and Instance UIDs.
    transfer_syntax_uid : str
        The presentation context's transfer syntax.

    Returns
    -------
    bytes
        132 + group length bytes, to be followed by the dataset as received.
    """
    group = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _padded(sop_class_uid, b"\0")),
        _element(0x00020003, b"UI", _padded(sop_instance_uid, b"\0")),
        _element(0x00020010, b"UI", _padded(transfer_syntax_uid, b"\0")),
        _element(0x00020012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _element(0x00020013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    length = _element(0x00020000, b"UL", struct.pack("<I", len(group)))
    return b"\0" * 128 + b"DICM" + length + group


def make_ae(config: ListenerConfig | None = None) -> NoDelayAE:
    """Build the listener's application entity (not yet started).

    It supports Verification and Storage, as SCP, for
    :data:`IMAGE_STORAGE_CLASSES` and :data:`DOCUMENT_STORAGE_CLASSES` in every
    syntax of :data:`TRANSFER_SYNTAXES`, and sets ``TCP_NODELAY`` on its sockets.

    Parameters
    ----------
    config : ListenerConfig, optional
        Defaults to ``ListenerConfig()``.

    Returns
    -------
    NoDelayAE
        The configured AE; start it with :func:`start_listener`.

    Raises
    ------
    TypeError
        If ``config`` is not a :class:`ListenerConfig`.
    """
    config = ListenerConfig() if config is None else config
    if not isinstance(config, ListenerConfig):
        raise TypeError(f"config: expected ListenerConfig, got {type(config).__name__}")
    ae = NoDelayAE(ae_title=config.ae_title)
    ae.add_supported_context(sop_class.Verification)
    for abstract in IMAGE_STORAGE_CLASSES + DOCUMENT_STORAGE_CLASSES:
        ae.add_supported_context(abstract, list(TRANSFER_SYNTAXES))
    ae.require_calling_aet = list(config.allowed_calling_aets)
    ae.require_called_aet = config.require_called_aet
    ae.maximum_associations = config.max_associations
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    ae.network_timeout = config.network_timeout
    ae.maximum_pdu_size = config.maximum_pdu_size
    return ae


def handle_store(
    event: Event,
    spool: Spool,
    on_stored: OnStored | None = None,
    stats: ListenerStats | None = None,
) -> int:
    """C-STORE handler: parse the header, store the raw bytes, tell ``on_stored``.

    Bind it with ``(evt.EVT_C_STORE, handle_store, [spool, on_stored, stats])``.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-STORE request event.
    spool : Spool
        Where instances go.
    on_stored : callable, optional
        Called with a :class:`StoredInstance` after the file is durable,
        duplicates included.
    stats : ListenerStats, optional
        Counters to update.

    Returns
    -------
    int
        The status answered to the sender (see the module docstring).
    """
    count = stats.add if stats is not None else (lambda name, size=0: None)
    stream: BytesIO = event.request.DataSet  # type: ignore[assignment]
    try:
        meta = file_meta_bytes(event.request.AffectedSOPClassUID, event.request.AffectedSOPInstanceUID,
                               event.context.transfer_syntax)
        header = _read_header(stream, event.context.transfer_syntax, meta)
        study_uid = validate_uid(header.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validate_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = validate_uid(header.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class_uid = str(header.get("SOPClassUID", "") or event.request.AffectedSOPClassUID)
        modality = str(header.get("Modality", "") or "")
    except InvalidUIDError as exc:
        count("undecodable")
        LOGGER.warning("C-STORE refused 0xC210: %s", exc)
        return CANNOT_UNDERSTAND
    except Exception as exc:  # pydicom raises many types on garbage
        count("undecodable")
        LOGGER.warning("C-STORE refused 0xC210: cannot parse dataset (%s)", type(exc).__name__)
        return CANNOT_UNDERSTAND

    if sop_uid != event.request.AffectedSOPInstanceUID:
        LOGGER.warning(
            "SOP Instance UID %s in dataset differs from request's %s; using the dataset's",
            sop_uid,
            event.request.AffectedSOPInstanceUID,
        )
    try:
        with stream.getbuffer() as body:  # the received bytes, written without a copy
            written = spool.store(study_uid, series_uid, sop_uid, (meta, body), len(meta))
            digest = hashlib.sha1(body).hexdigest()
    except SpoolFullError as exc:
        count("write_failed")
        LOGGER.error("C-STORE refused 0xA700: %s", exc)
        return OUT_OF_RESOURCES
    except SpoolError as exc:
        count("write_failed")
        LOGGER.error("C-STORE refused 0xA700: %s", exc)
        return OUT_OF_RESOURCES

    stored = StoredInstance(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        modality=modality,
        path=written.path,
        size=written.size,
        calling_ae_title=event.assoc.requestor.ae_title,
        outcome=written.outcome,
        digest=digest,
    )
    if on_stored is not None:
        try:
            on_stored(stored)
        except Exception:
            count("callback_failed", written.size)
            LOGGER.exception("C-STORE refused 0xA700: on_stored failed for %s (file kept)", sop_uid)
            return OUT_OF_RESOURCES
    count(written.outcome.value, written.size)
    LOGGER.debug("stored %s/%s/%s (%s)", study_uid, series_uid, sop_uid, written.outcome.value)
    return SUCCESS


def handle_released(event: Event, stats: ListenerStats | None = None) -> None:
    """Log one line per finished association: peer AE title and running totals."""
    totals = stats.snapshot() if stats is not None else {}
    LOGGER.info(
        "association from %s ended; totals %s",
        event.assoc.requestor.ae_title,
        " ".join(f"{k}={v}" for k, v in totals.items()),
    )


def store_handlers(
    spool: Spool, on_stored: OnStored | None = None, stats: ListenerStats | None = None
) -> list[tuple[Any, ...]]:
    """The ``evt_handlers`` list that wires :func:`handle_store` to a spool."""
    return [
        (evt.EVT_C_STORE, handle_store, [spool, on_stored, stats]),
        (evt.EVT_RELEASED, handle_released, [stats]),
        (evt.EVT_ABORTED, handle_released, [stats]),
    ]


def start_listener(
    spool: Spool,
    config: ListenerConfig | None = None,
    on_stored: OnStored | None = None,
    stats: ListenerStats | None = None,
    block: bool = False,
    server_class: type[ThreadedAssociationServer] = LeanAssociationServer,
) -> ThreadedAssociationServer | None:
    """Start the listener on ``(config.host, config.port)``.

    Parameters
    ----------
    spool : Spool
        Where received instances are stored.
    config : ListenerConfig, optional
        AE title, address, limits; defaults to ``ListenerConfig()``.
    on_stored : callable, optional
        Called with each :class:`StoredInstance` once it is durable.
    stats : ListenerStats, optional
        Counters the handlers update.
    block : bool, optional
        ``False`` (default) serves from a background thread and returns the
        server (stop it with ``server.shutdown()``); ``True`` serves until
        the server is shut down from another thread and returns ``None``.
    server_class : type, optional
        The server; :class:`dicom_io.transport.LeanAssociationServer` (default)
        or a subclass of it.

    Returns
    -------
    pynetdicom.transport.ThreadedAssociationServer or None
        The running server when ``block`` is ``False``; its
        ``server_address`` gives the bound port.

    Raises
    ------
    TypeError
        If ``spool`` is not a :class:`Spool`.
    OSError
        If the address cannot be bound.
    """
    if not isinstance(spool, Spool):
        raise TypeError(f"spool: expected Spool, got {type(spool).__name__}")
    config = ListenerConfig() if config is None else config
    ae = make_ae(config)
    server = ae.make_server((config.host, config.port), evt_handlers=store_handlers(spool, on_stored, stats),
                            server_class=server_class)
    ae._servers.append(server)  # pynetdicom's shutdown() removes it from there
    LOGGER.info("listening as %s on %s:%s", config.ae_title, config.host, config.port)
    if block:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.shutdown()
        return None
    threading.Thread(target=server.serve_forever, name="discus-acceptor", daemon=True).start()
    return server
