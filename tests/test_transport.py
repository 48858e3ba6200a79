"""The lean acceptor pieces of dicom_io.transport, checked against pynetdicom's own encoders."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from dicom_io import transport
from dicom_io.transport import LeanAssociation, LeanAssociationSocket, encode_store_response, pdv_items


def store_response(status: int, sop_instance_uid: str) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = MRImageStorage
    rsp.AffectedSOPInstanceUID = sop_instance_uid
    rsp.Status = status
    return rsp


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210])
@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45"])  # odd and even lengths
def test_store_response_is_pynetdicoms(status: int, sop_instance_uid: str) -> None:
    rsp = store_response(status, sop_instance_uid)
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert encode_store_response(rsp) == encode(message.command_set, True, True)


def test_other_responses_left_to_pynetdicom() -> None:
    with_comment = store_response(0xC210, "1.2.3")
    with_comment.ErrorComment = "cannot parse"
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = MRImageStorage, "1.2.3"
    no_uid = store_response(0, "1.2.3")
    no_uid.AffectedSOPInstanceUID = None
    assert encode_store_response(with_comment) is None
    assert encode_store_response(request) is None
    assert encode_store_response(no_uid) is None
    assert encode_store_response("not a primitive") is None


def test_lean_socket_reads_whole_pdus_and_stops_at_eof(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "RECV_STEP", 30_000)  # a PDU longer than one piece, too
    ours, peer = socket.socketpair()
    sock = LeanAssociationSocket(_unlimited(), ours)
    payload = bytes(range(256)) * 1000

    def send_in_pieces() -> None:
        for start in range(0, len(payload), 7000):
            peer.sendall(payload[start:start + 7000])
        peer.close()

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    try:
        assert sock.recv(100_000) == payload[:100_000]
        assert sock.recv(len(payload)) == payload[100_000:]  # closed early: what arrived
    finally:
        sender.join()
        sock.close()


def p_data_tf(*items: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack(">LB", len(pdv) + 1, cid) + pdv for cid, pdv in items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def test_pdv_items_are_pynetdicoms_decoding() -> None:
    pdu = p_data_tf((1, b"\x03command"), (3, b"\x00" + bytes(range(256)) * 40))
    decoded = P_DATA_TF()
    decoded.decode(pdu)
    expected = decoded.to_primitive().presentation_data_value_list
    got = pdv_items(pdu)
    assert got is not None
    assert [(cid, bytes(data)) for cid, data in got] == [(cid, bytes(data)) for cid, data in expected]


@pytest.mark.parametrize("pdu", [
    p_data_tf((1, b"\x03abc"))[:-1],  # shorter than its PDU length
    p_data_tf((1, b"\x03abc")) + b"\x00",  # longer
    struct.pack(">BBL", 4, 0, 6) + struct.pack(">LB", 9, 1) + b"\x03",  # item runs past the end
    struct.pack(">BBL", 4, 0, 5) + struct.pack(">LB", 1, 1),  # item with no header byte
    struct.pack(">BBL", 4, 0, 0),  # no items
])
def test_malformed_p_data_tf_is_refused(pdu: bytes) -> None:
    assert pdv_items(pdu) is None


def _unlimited() -> LeanAssociation:
    """An association that announced no maximum PDU size (so any length claimed is read as it arrives)."""
    assoc = LeanAssociation(AE())
    assoc.acceptor.maximum_length = 0
    return assoc


def test_a_pdu_longer_than_announced_is_refused_before_reading() -> None:
    ours, peer = socket.socketpair()
    assoc = LeanAssociation(AE())
    assoc.acceptor.maximum_length = 4096
    sock = LeanAssociationSocket(assoc, ours)
    peer.sendall(b"x" * 8192)
    try:
        assert sock.recv(4096 + 6) == b"x" * 4102  # within the maximum (a PDU's 6 header bytes aside)
        assert sock.recv(8192) == b""  # longer: treated as a closed connection
        assert sock.socket is None
    finally:
        peer.close()
        sock.close()


def test_claimed_pdu_length_is_not_allocated_up_front() -> None:
    ours, peer = socket.socketpair()
    sock = LeanAssociationSocket(_unlimited(), ours)
    peer.sendall(b"0123456789")
    peer.close()
    try:
        assert sock.recv(10**12) == b"0123456789"  # a terabyte claimed, ten bytes sent
    finally:
        sock.close()
