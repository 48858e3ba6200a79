"""The listener, exercised with DCMTK's storescu/echoscu and the project's SCU over real TCP."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid
from pynetdicom import AE, evt, sop_class
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.scp import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    ListenerConfig,
    ListenerStats,
    StoredInstance,
    file_meta_bytes,
    make_ae,
    start_listener,
)
from dicom_io.scu import send_files
from dicom_io.spool import Spool, StoreOutcomeValues
from dicom_io.transport import LeanAssociation, LeanAssociationServer, NoDelayAE
from tests.conftest import NODELAY_ENV, need
from tests.dicom_samples import make_image, write_stack


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, file meta (group 0002, explicit VR LE) excluded."""
    data = path.read_bytes()
    pos = 132 if data[128:132] == b"DICM" else 0  # files written without preamble start at 0
    while data[pos : pos + 2] == b"\x02\x00":
        if data[pos + 4 : pos + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return data[pos:]


@dataclass
class Running:
    port: int
    spool: Spool
    stats: ListenerStats
    stored: list[StoredInstance] = field(default_factory=list)
    fail_callback: bool = False

    def on_stored(self, item: StoredInstance) -> None:
        self.stored.append(item)
        if self.fail_callback:
            raise RuntimeError("index unavailable")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Running]:
    stats = ListenerStats()
    running = Running(0, Spool(tmp_path / "spool"), stats)
    config = ListenerConfig(host="127.0.0.1", port=0, allowed_calling_aets=["STORESCU", "DISCUS", "ECHOSCU"])
    server = start_listener(running.spool, config, on_stored=running.on_stored, stats=stats)
    assert server is not None
    running.port = server.server_address[1]
    yield running
    server.shutdown()


def storescu(port: int, paths: list[Path], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [need("storescu"), *args, "-aec", "DISCUS", "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, env={**os.environ, **NODELAY_ENV}, capture_output=True, text=True, timeout=60)


def test_storescu_series_stored_byte_equal(listener: Running, tmp_path: Path) -> None:
    paths = write_stack(tmp_path / "src", 5, description="SAG T2")
    result = storescu(listener.port, paths)
    assert result.returncode == 0, result.stderr
    assert len(listener.stored) == 5
    for src, item in zip(paths, listener.stored):
        ds = dcmread(src)
        assert item.path == listener.spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert dataset_bytes(item.path) == dataset_bytes(src)
        meta = read_file_meta_info(item.path)
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert item.outcome is StoreOutcomeValues.NEW
        assert (item.modality, item.calling_ae_title) == ("MR", "STORESCU")
        assert item.digest == hashlib.sha1(dataset_bytes(item.path)).hexdigest()
    assert listener.stats.snapshot()["new"] == 5
    assert not list(listener.spool.root.rglob("*.tmp"))


def test_resend_is_duplicate_and_change_replaces(listener: Running, tmp_path: Path) -> None:
    paths = write_stack(tmp_path / "src", 3)
    assert storescu(listener.port, paths).returncode == 0
    inodes = [item.path.stat().st_ino for item in listener.stored]
    assert storescu(listener.port, paths).returncode == 0
    assert [i.outcome for i in listener.stored[3:]] == [StoreOutcomeValues.DUPLICATE] * 3
    assert [item.path.stat().st_ino for item in listener.stored[:3]] == inodes

    # Same SOP Instance, other pixels: replaced and reported as changed.
    ds = dcmread(paths[0])
    arr = ds.pixel_array.copy()
    arr[5, 5] += 7
    ds.PixelData = arr.tobytes()
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    assert storescu(listener.port, [changed]).returncode == 0
    assert listener.stored[-1].outcome is StoreOutcomeValues.CHANGED
    assert dataset_bytes(listener.stored[-1].path) == dataset_bytes(changed)
    assert listener.stats.snapshot() | {} == {
        **listener.stats.snapshot(),
        "new": 3,
        "duplicate": 3,
        "changed": 1,
    }


def test_unknown_calling_aet_rejected(listener: Running, tmp_path: Path) -> None:
    paths = write_stack(tmp_path / "src", 1)
    result = storescu(listener.port, paths, "-aet", "INTRUDER")
    assert result.returncode != 0
    assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
    assert listener.stored == [] and listener.spool.studies() == []
    [res] = send_files(paths, "127.0.0.1", listener.port, "DISCUS", "INTRUDER")
    assert res.error is not None and res.error.transient is False


def test_echoscu(listener: Running) -> None:
    cmd = [need("echoscu"), "-aec", "DISCUS", "127.0.0.1", str(listener.port)]
    result = subprocess.run(cmd, env={**os.environ, **NODELAY_ENV}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def raw_store(port: int, sop_class: str, sop_uid: str, body: bytes) -> int:
    """C-STORE arbitrary dataset bytes, bypassing every client-side check; return the status."""
    ae = AE(ae_title="DISCUS")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DISCUS")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_uid
        req.DataSet = BytesIO(body)
        # As Association.send_c_store does: pause the reactor while waiting for the response.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        return int(rsp.Status)
    finally:
        assoc.release()


def test_undecodable_and_bad_uids_answer_c210(listener: Running, tmp_path: Path) -> None:
    mr = "1.2.840.10008.5.1.4.1.1.4"
    no_study = make_image(study_uid="1.2.3", series_uid="1.2.3.4")
    del no_study.StudyInstanceUID
    no_study.save_as(tmp_path / "no_study.dcm")
    evil = make_image(study_uid="1.2.3", series_uid="1.2.3.4")
    evil.SeriesInstanceUID = "../../etc"
    evil.save_as(tmp_path / "evil.dcm")
    bodies = [
        b"\x08\x00\x18\x00UI\xff\xff" + bytes(range(64)),  # element length past the end
        b"\x00" * 3,
        dataset_bytes(tmp_path / "no_study.dcm"),
        dataset_bytes(tmp_path / "evil.dcm"),
    ]
    statuses = [raw_store(listener.port, mr, "1.2.3.4.5", body) for body in bodies]
    assert statuses == [CANNOT_UNDERSTAND] * 4
    assert listener.stored == [] and listener.spool.studies() == []
    assert listener.stats.snapshot()["undecodable"] == 4
    assert [p for p in tmp_path.rglob("*") if p.name == "etc"] == []


def test_scu_refuses_unreadable_file_locally(listener: Running, tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    [res] = send_files([tmp_path / "junk.dcm"], "127.0.0.1", listener.port, "DISCUS", "DISCUS")
    assert res.status is None and res.error is not None and res.error.transient is False


def test_disk_full_answers_a700(listener: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_stack(tmp_path / "src", 2)
    real_write, real_writev = os.write, os.writev

    def full(real: Any) -> Any:
        def write(fd: int, data: Any) -> int:
            # Only the spool's writes fail; log handlers and pipes keep working.
            if os.path.realpath(f"/proc/self/fd/{fd}").endswith(".tmp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)

        return write

    monkeypatch.setattr(os, "write", full(real_write))
    monkeypatch.setattr(os, "writev", full(real_writev))
    results = send_files(paths, "127.0.0.1", listener.port, "DISCUS", "DISCUS")
    monkeypatch.undo()
    assert [r.status for r in results] == [OUT_OF_RESOURCES] * 2
    assert all(r.error is not None and r.error.transient for r in results)
    assert listener.stored == []
    assert [p for p in listener.spool.root.rglob("*") if p.is_file()] == []
    # Space again: the retry succeeds.
    assert all(r.ok for r in send_files(paths, "127.0.0.1", listener.port, "DISCUS", "DISCUS"))
    assert len(listener.stored) == 2


def test_callback_failure_answers_a700_and_keeps_file(listener: Running, tmp_path: Path) -> None:
    paths = write_stack(tmp_path / "src", 1)
    listener.fail_callback = True
    [res] = send_files(paths, "127.0.0.1", listener.port, "DISCUS", "DISCUS")
    assert res.status == OUT_OF_RESOURCES and res.error is not None and res.error.transient
    assert listener.stored[0].path.exists()
    listener.fail_callback = False
    [res] = send_files(paths, "127.0.0.1", listener.port, "DISCUS", "DISCUS")
    assert res.ok
    assert listener.stored[-1].outcome is StoreOutcomeValues.DUPLICATE  # the index catches up


@pytest.mark.parametrize(
    ("syntax", "propose"), [(RLELossless, "-xr"), (JPEGLSLossless, "-xt"), (JPEG2000Lossless, "-xv")]
)
def test_compressed_stored_as_received(listener: Running, tmp_path: Path, syntax: str, propose: str) -> None:
    ds = make_image(study_uid=generate_uid(), series_uid=generate_uid(), rows=64, columns=64)
    ds.compress(syntax)
    src = tmp_path / "compressed.dcm"
    ds.save_as(src)
    result = storescu(listener.port, [src], propose, "-R")  # propose only the file's own syntax
    assert result.returncode == 0, result.stderr
    [item] = listener.stored
    assert item.transfer_syntax_uid == syntax
    assert read_file_meta_info(item.path).TransferSyntaxUID == syntax
    assert dataset_bytes(item.path) == dataset_bytes(src)


def test_jpeg_lossless_sv1_from_dcmcjpeg(listener: Running, tmp_path: Path) -> None:
    [plain] = write_stack(tmp_path / "src", 1, rows=64, columns=64)
    src = tmp_path / "sv1.dcm"
    subprocess.run([need("dcmcjpeg"), "+e1", str(plain), str(src)], check=True, capture_output=True)
    assert storescu(listener.port, [src], "-xs", "-R").returncode == 0
    [item] = listener.stored
    assert item.transfer_syntax_uid == "1.2.840.10008.1.2.4.70"
    assert dataset_bytes(item.path) == dataset_bytes(src)


@pytest.mark.parametrize("server_class", [ThreadedAssociationServer, LeanAssociationServer])
def test_sockets_have_nodelay(tmp_path: Path, server_class: type) -> None:
    seen: list[int] = []

    def on_open(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    ae = make_ae(ListenerConfig(host="127.0.0.1", port=0))
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
                            server_class=server_class)
    ae._servers.append(server)  # where pynetdicom's shutdown() looks for it
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = NoDelayAE(ae_title="SCU")
        client.add_requested_context(sop_class.Verification)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="DISCUS")
        assert assoc.is_established
        scu_nodelay = assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assoc.release()
    finally:
        server.shutdown()
    assert seen and all(v != 0 for v in seen)  # the socket the listener accepted
    assert scu_nodelay != 0  # the socket the client opened


def test_logs_carry_no_patient_name(listener: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    paths = write_stack(tmp_path / "src", 2, patient_name="Secretname^Patient")
    assert storescu(listener.port, paths).returncode == 0
    assert len(listener.stored) == 2
    assert listener.stored[0].sop_instance_uid in caplog.text  # the handler did log
    assert "Secretname" not in caplog.text


def test_sr_is_stored_too(listener: Running, tmp_path: Path) -> None:
    ds = make_image(study_uid=generate_uid(), series_uid=generate_uid(), modality="MR",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33")
    for name in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                 "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, name)
    ds.Modality = "SR"
    ds.save_as(tmp_path / "sr.dcm")
    assert storescu(listener.port, [tmp_path / "sr.dcm"]).returncode == 0
    assert listener.stored[0].modality == "SR"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="ae_title"):
        ListenerConfig(ae_title="X" * 17)
    with pytest.raises(ValueError, match="port"):
        ListenerConfig(port=70000)
    with pytest.raises(TypeError, match="allowed_calling_aets"):
        ListenerConfig(allowed_calling_aets="MODALITY")
    with pytest.raises(ValueError, match="dimse_timeout"):
        ListenerConfig(dimse_timeout=0)
    with pytest.raises(ValueError, match="maximum_pdu_size"):
        ListenerConfig(maximum_pdu_size=100)
    ae = make_ae(ListenerConfig(ae_title="PACSAI", allowed_calling_aets=["A"], max_associations=3,
                                acse_timeout=5, maximum_pdu_size=0))
    assert (ae.ae_title, ae.require_calling_aet, ae.maximum_associations) == ("PACSAI", ["A"], 3)
    assert (ae.acse_timeout, ae.maximum_pdu_size) == (5.0, 0)
    syntaxes = {cx.abstract_syntax: cx.transfer_syntax for cx in ae.supported_contexts}
    assert "1.2.840.10008.1.2.4.90" in syntaxes["1.2.840.10008.5.1.4.1.1.4"]  # J2K lossless for MR
    assert "1.2.840.10008.5.1.4.1.1.88.34" in syntaxes  # Comprehensive 3D SR
    assert "1.2.840.10008.1.1" in syntaxes  # Verification


def test_pixels_unchanged_after_roundtrip(listener: Running, tmp_path: Path) -> None:
    paths = write_stack(tmp_path / "src", 1, rows=32, columns=32)
    assert storescu(listener.port, paths).returncode == 0
    assert np.array_equal(dcmread(listener.stored[0].path).pixel_array, dcmread(paths[0]).pixel_array)


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45"])  # odd and even lengths
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, "1.2.840.10008.1.2", JPEG2000Lossless])
def test_file_meta_bytes_are_pynetdicoms(sop_instance_uid: str, syntax: str) -> None:
    expected = encode_file_meta(create_file_meta(
        sop_class_uid=sop_class.MRImageStorage, sop_instance_uid=sop_instance_uid, transfer_syntax=syntax))
    got = file_meta_bytes(sop_class.MRImageStorage, sop_instance_uid, syntax)
    assert got == b"\0" * 128 + b"DICM" + expected
    meta = dcmread(BytesIO(got + b"\x08\x00\x60\x00CS\x02\x00MR")).file_meta  # with one element
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (sop_instance_uid, syntax)


def test_listener_associations_are_lean(listener: Running, tmp_path: Path) -> None:
    """The listener's associations wait instead of polling and carry no per-PDU log handlers."""
    client = NoDelayAE(ae_title="DISCUS")
    client.add_requested_context(sop_class.MRImageStorage, ExplicitVRLittleEndian)
    assoc = client.associate("127.0.0.1", listener.port, ae_title="DISCUS")
    assert assoc.is_established
    try:
        for path in write_stack(tmp_path / "src", 3):
            assert assoc.send_c_store(dcmread(path)).Status == 0
        acceptors = [t for t in threading.enumerate() if isinstance(t, LeanAssociation) and t.is_established]
    finally:
        assoc.release()
    assert len(listener.stored) == 3
    assert acceptors  # the listener's side of this association
    for acceptor in acceptors:
        for event in (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT):
            assert acceptor.get_handlers(event) == []


def test_malformed_pdu_aborts_the_association_and_listener_goes_on(listener: Running, tmp_path: Path) -> None:
    client = NoDelayAE(ae_title="DISCUS")
    client.add_requested_context(sop_class.MRImageStorage, ExplicitVRLittleEndian)
    assoc = client.associate("127.0.0.1", listener.port, ae_title="DISCUS")
    assert assoc.is_established
    # A P-DATA-TF whose only item claims more bytes than the PDU holds.
    assoc.dul.socket.socket.sendall(b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x09\x01\x03")
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    paths = write_stack(tmp_path / "src", 1)
    assert storescu(listener.port, paths).returncode == 0
    assert len(listener.stored) == 1


def test_peers_that_stall_mid_pdu_are_dropped_and_slots_come_back(tmp_path: Path) -> None:
    """Ten connections that send a bare P-DATA header claiming more bytes, then nothing, hold no slot for long."""
    import socket as socket_module
    import time

    stats = ListenerStats()
    running = Running(0, Spool(tmp_path / "spool"), stats)
    config = ListenerConfig(host="127.0.0.1", port=0, allowed_calling_aets=["STORESCU", "DISCUS"],
                            max_associations=10, network_timeout=2.0, acse_timeout=2.0)
    server = start_listener(running.spool, config, on_stored=running.on_stored, stats=stats)
    try:
        port = server.server_address[1]
        stalled = []
        for _ in range(10):
            s = socket_module.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"\x01\x00" + (1000).to_bytes(4, "big"))  # an A-ASSOCIATE-RQ header, no body
            stalled.append(s)
        try:
            time.sleep(config.network_timeout + 2.0)
            # every stalled peer was dropped: the listener closed its side
            for s in stalled:
                s.settimeout(5)  # a peer still held open would time out here
                while s.recv(1024):  # an A-ABORT may come before the close
                    pass
            paths = write_stack(tmp_path / "src", 2, description="SAG T2")
            result = storescu(port, paths)
            assert result.returncode == 0 and len(running.stored) == 2, result.stderr
        finally:
            for s in stalled:
                s.close()
    finally:
        server.shutdown()


def test_a_pdu_longer_than_the_maximum_drops_the_peer_not_the_listener(tmp_path: Path) -> None:
    """A peer claiming a 64 MiB PDU (more than the 4 MiB accepted) and sending it is cut off at once."""
    import socket as socket_module
    import time

    stats = ListenerStats()
    running = Running(0, Spool(tmp_path / "spool"), stats)
    config = ListenerConfig(host="127.0.0.1", port=0, allowed_calling_aets=["STORESCU", "DISCUS"])
    assert config.maximum_pdu_size == 4 * 1024 * 1024
    server = start_listener(running.spool, config, on_stored=running.on_stored, stats=stats)
    try:
        port = server.server_address[1]
        s = socket_module.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"\x01\x00" + (64 * 1024 * 1024).to_bytes(4, "big"))
        t0 = time.monotonic()
        sent = 0
        try:
            chunk = bytes(1024 * 1024)
            while sent < 64 * 1024 * 1024:
                sent += s.send(chunk)
        except OSError:
            pass  # the listener closed the connection: what this test wants
        s.settimeout(5)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()
        assert time.monotonic() - t0 < 5 and sent < 64 * 1024 * 1024
        paths = write_stack(tmp_path / "src", 2, description="SAG T2")
        result = storescu(port, paths)
        assert result.returncode == 0 and len(running.stored) == 2, result.stderr
    finally:
        server.shutdown()
