"""Sockets and associations for the project's DICOM traffic.

Nagle's algorithm holds back the small C-STORE response PDU until the peer's
delayed ACK arrives, about 40-50 ms per instance on Linux, which caps a single
association at some twenty instances a second. Every socket the project opens
(listener and SCU) therefore sets ``TCP_NODELAY``.

The listener's associations are also *lean* (:class:`LeanAssociationServer`).
pynetdicom polls: its DUL thread sleeps a millisecond whenever it finds nothing
to do and its association thread sleeps a millisecond before every look for a
message, so each C-STORE waits one to two milliseconds for nobody; it also
reads PDUs in 4 KB pieces, decodes each P-DATA-TF into objects (copying the data
three times), and binds log handlers that format (and copy) every message and
PDU even when their logger drops the lines. A lean association waits in ``poll``
on its socket and on a waker that a queued outgoing PDU writes to, waits for a
DIMSE message on its queue instead of sleeping, reads each PDU with one
``recv_into`` and hands P-DATA-TF items to the DIMSE provider as views,
encodes C-STORE responses directly and binds no log handlers. Association
negotiation, release, abort, timeouts, the state machine for everything but
P-DATA in the established state, and the service classes are pynetdicom's.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import queue
import select
import socket
import ssl
import struct
import threading
from copy import deepcopy
from datetime import datetime
from typing import Any

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AddressInformation,
    AssociationServer,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

log = logging.getLogger(__name__)

#: Longest a lean association's threads wait for work before they look at timers and state again.
WAIT = 0.005
#: Largest piece of a PDU a lean association's socket allocates before it has arrived.
RECV_STEP = 4 * 1024 * 1024


#: The pynetdicom release whose private members the lean transport was written against.
SUPPORTED_PYNETDICOM = "3.0.4"

#: Private members of pynetdicom the lean transport overrides or reads, with the
#: parameters of the methods; checked at start (:func:`lean_transport_problems`)
#: and by a contract test, so an upgrade that changes one falls back to the stock
#: server instead of misbehaving.
PRIVATE_METHODS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pynetdicom.ae.ApplicationEntity", "_create_socket", ("self", "assoc", "address", "tls_args")),
    ("pynetdicom.dul.DULServiceProvider", "_read_pdu_data", ("self",)),
    ("pynetdicom.transport.RequestHandler", "_create_association", ("self",)),
    ("pynetdicom.association.Association", "_bind_defaults", ("self",)),
    ("pynetdicom.transport.AssociationServer", "_bind_defaults", ("self",)),
)
#: Private attributes set on instances (checked on live objects by the contract test).
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("AssociationSocket", "_is_connected"),
    ("DULServiceProvider", "_run_loop_delay"),
    ("Association", "_server"),
    ("AssociationServer", "_handlers"),
    ("ApplicationEntity", "_servers"),
    ("pynetdicom.events", "_INTERVENTION_EVENTS"),
    ("pynetdicom._globals", "MODE_ACCEPTOR"),
)


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def lean_transport_problems() -> list[str]:
    """Why the lean transport cannot be trusted with the installed pynetdicom ([] when it can).

    The version must be :data:`SUPPORTED_PYNETDICOM` and every method of
    :data:`PRIVATE_METHODS` must exist with the expected parameters.
    """
    problems = []
    version = getattr(pynetdicom, "__version__", "unknown")
    if version != SUPPORTED_PYNETDICOM:
        problems.append(f"pynetdicom {version} is installed; the lean transport was written for "
                        f"{SUPPORTED_PYNETDICOM}")
    for owner, name, params in PRIVATE_METHODS:
        try:
            method = getattr(_resolve(owner), name)
            found = tuple(inspect.signature(method).parameters)
        except (AttributeError, ImportError, TypeError, ValueError):
            problems.append(f"{owner}.{name} is missing")
            continue
        if found != params:
            problems.append(f"{owner}.{name} takes {found}, expected {params}")
    return problems


def set_nodelay(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` on a TCP socket (no-op for non-TCP sockets)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _NoDelayServerMixin:
    """Accepts connections with ``TCP_NODELAY`` set and the AE's network timeout on every read.

    An accepted socket has no timeout of its own: a peer that claims a PDU length
    and then sends nothing (or one byte a second) would block the reading thread,
    and hold an association slot, for as long as it kept the connection open. With
    the timeout, a read that waits longer than ``network_timeout`` fails, and the
    association is closed as if the peer had (Evt17).
    """

    def get_request(self) -> tuple[socket.socket, Any]:
        client_socket, address = super().get_request()  # type: ignore[misc]
        set_nodelay(client_socket)
        timeout = getattr(getattr(self, "ae", None), "network_timeout", None)
        if timeout:
            client_socket.settimeout(float(timeout))
        return client_socket, address


class NoDelayAssociationServer(_NoDelayServerMixin, AssociationServer):
    """Blocking association server with ``TCP_NODELAY`` on accepted sockets."""


class NoDelayThreadedAssociationServer(_NoDelayServerMixin, ThreadedAssociationServer):
    """Threaded association server with ``TCP_NODELAY`` on accepted sockets."""


class NoDelayAE(AE):
    """A pynetdicom ``AE`` whose requestor and acceptor sockets set ``TCP_NODELAY``."""

    def _create_socket(
        self, assoc: Any, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            set_nodelay(sock.socket)
        return sock

    def make_server(self, address: Any, *args: Any, server_class: Any = None, **kwargs: Any) -> Any:
        if server_class is None or server_class is AssociationServer:
            server_class = NoDelayAssociationServer
        elif server_class is ThreadedAssociationServer:
            server_class = NoDelayThreadedAssociationServer
        return super().make_server(address, *args, server_class=server_class, **kwargs)


class _Waker:
    """A connected socket pair: a byte sent into one end makes the other readable."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        try:
            self.writer.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (nobody waits)
            pass

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:  # nothing left (BlockingIOError) or closed
            pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of primitives to send; putting one wakes the DUL from ``poll``."""

    def __init__(self, waker: _Waker) -> None:
        super().__init__()
        self._waker = waker

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._waker.wake()


def _fill(sock: socket.socket, buffer: bytearray) -> int:
    """Receive into ``buffer`` until it is full or the peer closes; return the bytes received."""
    got = 0
    with memoryview(buffer) as view:
        while got < len(buffer):
            n = sock.recv_into(view[got:])
            if not n:
                break
            got += n
    return got


class LeanAssociationSocket(AssociationSocket):
    """An accepted association's socket that the DUL waits on instead of polling.

    ``ready`` blocks in ``poll`` for at most :data:`WAIT` seconds on the peer's socket and
    on the association's waker, so the DUL thread wakes as soon as the peer sends or a PDU
    is queued for sending. ``recv`` reads a whole PDU with ``recv_into``.
    """

    def __init__(self, assoc: LeanAssociation, client_socket: socket.socket) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._waker = assoc.waker
        self._fd = client_socket.fileno()
        # poll, not select: no limit on descriptor numbers (each association holds three).
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._poll.register(self._waker.reader, select.POLLIN)

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted data poll() cannot see
        dul = self._assoc.dul
        pending = not dul.event_queue.empty() or not dul.to_provider_queue.empty()
        try:
            events = self._poll.poll(0 if pending else WAIT * 1000)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # Transport connection closed
            return False
        readable = False
        for fd, event in events:
            if fd == self._fd:
                # Data, or a hang-up or error that recv() will report; not a descriptor
                # closed under us (POLLNVAL), which close() reports itself.
                readable = not event & select.POLLNVAL
            else:
                self._waker.drain()
        return readable and self.socket is not None and self._is_connected

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:  # closed meanwhile: nothing arrives any more
            return bytearray()
        limit = int(getattr(self._assoc.acceptor, "maximum_length", 0) or 0)
        if limit and nr_bytes > limit + 6:
            # A PDU longer than the listener accepts (its maximum PDU size, told to every
            # peer): one peer must not take the process's memory. Treated as a closed
            # connection, which aborts the association.
            log.warning("a peer sent a PDU of %d bytes, more than the %d accepted; connection dropped",
                        nr_bytes, limit)
            self.close()
            return bytearray()
        # Memory follows what arrives, in pieces of at most RECV_STEP, so a PDU length a
        # peer merely claims allocates little.
        pieces = []
        got = 0
        while got < nr_bytes:
            piece = bytearray(min(nr_bytes - got, RECV_STEP))
            n = _fill(sock, piece)
            got += n
            if n < len(piece):  # connection closed: return what arrived, as pynetdicom does
                del piece[n:]
                pieces.append(piece)
                break
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else bytearray().join(pieces)

    def close(self) -> None:
        super().close()
        self._waker.close()


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def encode_store_response(rsp: Any) -> bytes | None:
    """The command set of a plain C-STORE response, Implicit VR Little Endian.

    Parameters
    ----------
    rsp : pynetdicom.dimse_primitives.C_STORE
        A response primitive: *Message ID Being Responded To*, *Status* and both affected
        UIDs set, nothing else.

    Returns
    -------
    bytes or None
        The encoded command set (group length first), byte for byte what pynetdicom
        encodes, or ``None`` when ``rsp`` is anything else (a request, an error comment
        or offending element, a missing UID); pynetdicom encodes those.
    """
    if type(rsp) is not C_STORE or rsp.MessageIDBeingRespondedTo is None or rsp.Status is None:
        return None
    if rsp.AffectedSOPClassUID is None or rsp.AffectedSOPInstanceUID is None:
        return None
    if rsp.ErrorComment is not None or rsp.OffendingElement is not None:
        return None
    body = b"".join((
        _ui(0x0002, rsp.AffectedSOPClassUID),
        _us(0x0100, 0x8001),  # Command Field: C-STORE-RSP
        _us(0x0120, rsp.MessageIDBeingRespondedTo),
        _us(0x0800, 0x0101),  # Command Data Set Type: no data set
        _us(0x0900, rsp.Status),
        _ui(0x1000, rsp.AffectedSOPInstanceUID),
    ))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


class LeanDIMSEServiceProvider(DIMSEServiceProvider):
    """DIMSE provider of a lean association: waits for messages, encodes C-STORE responses."""

    def get_msg(self, block: bool = False) -> Any:
        if not block and threading.current_thread() is self.assoc:
            # The reactor sleeps a millisecond and then looks without waiting; waiting
            # here hands it each message the moment it is complete.
            try:
                return self.msg_queue.get(timeout=WAIT)
            except queue.Empty:
                return None, None
        return super().get_msg(block)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = encode_store_response(primitive)
        peer_max = self.maximum_pdu_size
        if (command is None or (peer_max and len(command) + 6 > peer_max)
                or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
        self.dul.send_pdu(pdata)


_P_DATA_TF = 0x04


def pdv_items(pdu: bytes | bytearray) -> list[tuple[int, memoryview]] | None:
    """The presentation data values of an encoded P-DATA-TF PDU, without copying them.

    Parameters
    ----------
    pdu : bytes-like
        The whole PDU: type, reserved byte, 4-byte length, then PDV items (each a 4-byte
        item length, the presentation context ID, and the message control header and
        fragment).

    Returns
    -------
    list of (int, memoryview) or None
        ``(context ID, message control header + fragment)`` per item, views into
        ``pdu``; ``None`` when the items do not add up to the PDU length or one is empty.
    """
    view = memoryview(pdu)
    end = len(view)
    if end < 6 or int.from_bytes(view[2:6], "big") != end - 6:
        return None
    items = []
    pos = 6
    while pos < end:
        if pos + 6 > end:
            return None
        length = int.from_bytes(view[pos:pos + 4], "big")
        if length < 2 or pos + 4 + length > end:
            return None
        items.append((view[pos + 4], view[pos + 5:pos + 4 + length]))
        pos += 4 + length
    return items or None


class LeanDULServiceProvider(DULServiceProvider):
    """DUL of a lean association: a P-DATA-TF in Sta6 goes straight to the DIMSE provider.

    pynetdicom decodes each PDU into objects, copying its data three times, and runs it
    through the state machine, where P-DATA-TF in Sta6 (established) does only that hand-
    over (action DT-2) and stays in Sta6. Here the PDU is read with one ``recv_into`` and
    its items are handed over as views. Anything else, or any PDU while handlers watch
    PDUs or state transitions, takes pynetdicom's path.
    """

    def _read_pdu_data(self) -> None:
        sock = self.socket
        raw = sock.socket if sock is not None else None
        if (raw is None or isinstance(raw, ssl.SSLSocket)
                or self.state_machine.current_state != "Sta6"
                or self.assoc.get_handlers(evt.EVT_PDU_RECV)
                or self.assoc.get_handlers(evt.EVT_FSM_TRANSITION)):
            super()._read_pdu_data()
            return
        try:
            head = raw.recv(6, socket.MSG_PEEK)
        except OSError:
            head = b""
        if len(head) < 6 or head[0] != _P_DATA_TF:
            super()._read_pdu_data()  # it reads (and judges) the PDU itself
            return
        try:
            pdu = sock.recv(6 + int.from_bytes(head[2:6], "big"))
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # transport connection closed
            return
        if len(pdu) < 6 or int.from_bytes(pdu[2:6], "big") != len(pdu) - 6:
            self.event_queue.put("Evt17")  # closed before the whole PDU arrived
            return
        items = pdv_items(pdu)
        if items is None:
            self.event_queue.put("Evt19")  # invalid PDU
            return
        primitive = P_DATA()
        primitive.presentation_data_value_list.extend(items)  # type: ignore[arg-type]
        self.assoc.dimse.receive_primitive(primitive)


def _bind_intervention_defaults(target: Any) -> None:
    """Bind pynetdicom's default intervention handlers and none of its log handlers."""
    for event in evt._INTERVENTION_EVENTS:
        target.bind(event, evt.get_default_handler(event))


class LeanAssociation(Association):
    """An acceptor association whose threads wait for work instead of polling (see module doc)."""

    def _bind_defaults(self) -> None:
        _bind_intervention_defaults(self)

    def __init__(self, ae: Any) -> None:
        super().__init__(ae, MODE_ACCEPTOR)
        self.waker = _Waker()
        self.dul = LeanDULServiceProvider(self)
        self.acse_timeout, self.network_timeout = self.acse_timeout, self.network_timeout  # its timers
        self.dul.to_provider_queue = _WakingQueue(self.waker)
        self.dul._run_loop_delay = 0  # the DUL waits in LeanAssociationSocket.ready instead
        self.dimse = LeanDIMSEServiceProvider(self)

    def run(self) -> None:
        try:
            super().run()
        finally:
            if not self.dul.is_alive():
                self.waker.close()


class LeanRequestHandler(RequestHandler):
    """Makes a :class:`LeanAssociation` for each accepted connection."""

    def _create_association(self) -> Association:
        # pynetdicom's RequestHandler._create_association with the lean classes.
        assoc = LeanAssociation(self.ae)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(LeanAssociationSocket(assoc, self.request))  # type: ignore[arg-type]
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        return assoc


class LeanAssociationServer(_NoDelayServerMixin, ThreadedAssociationServer):
    """The listener's server: ``TCP_NODELAY``, lean associations, no per-PDU log handlers.

    pynetdicom's standard log handlers format every message and PDU (and copy each
    received dataset once) even when the ``pynetdicom`` logger drops the lines; the
    listener logs one line per association itself. Start it with
    ``ae.make_server(address, server_class=LeanAssociationServer, evt_handlers=...)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", LeanRequestHandler)
        super().__init__(*args, **kwargs)

    def _bind_defaults(self) -> None:
        _bind_intervention_defaults(self)
