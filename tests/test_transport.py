"""The lean acceptor pieces of dicom_io.transport, checked against pynetdicom's own encoders."""

from __future__ import annotations

import socket
import threading

import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_io.transport import LeanAssociation, LeanAssociationSocket, encode_store_response


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


def test_lean_socket_reads_whole_pdus_and_stops_at_eof() -> None:
    ours, peer = socket.socketpair()
    sock = LeanAssociationSocket(LeanAssociation(AE()), ours)
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
