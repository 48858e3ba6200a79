"""The C-STORE/C-ECHO client and the DICOMweb client against real peers, and how failures are sorted."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid
from pynetdicom import evt, sop_class

from dicom_io.dicomweb import qido, qido_instances, stow
from dicom_io.errors import ExportError
from dicom_io.scu import SendResult, classify_status, echo, raise_for_results, send_files
from dicom_io.transport import NoDelayAE
from tests.conftest import Orthanc, free_port
from tests.dicom_samples import make_image, write_stack


class Peer:
    """An in-process SCP with chosen contexts that answers a chosen status and keeps what it got."""

    def __init__(self, contexts: list[tuple[str, list[str]]], status: int = 0x0000) -> None:
        self.status = status
        self.received: list[tuple[str, object]] = []  # (transfer syntax, dataset)
        ae = NoDelayAE(ae_title="PEER")
        for abstract, syntaxes in contexts:
            ae.add_supported_context(abstract, syntaxes)
        ae.add_supported_context(sop_class.Verification)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.handle)])
        self.port = self.server.server_address[1]

    def handle(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append((str(event.context.transfer_syntax), ds))
        return self.status


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.server.shutdown()


def compressed_file(tmp_path: Path, syntax: str, name: str) -> Path:
    ds = make_image(study_uid=generate_uid(), series_uid=generate_uid(), rows=64, columns=64)
    ds.compress(syntax)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_send_to_orthanc_keeps_compression(orthanc: Orthanc, tmp_path: Path) -> None:
    plain = write_stack(tmp_path / "plain", 3)
    j2k = compressed_file(tmp_path, JPEG2000Lossless, "j2k.dcm")
    results = send_files([*plain, j2k], "127.0.0.1", orthanc.dicom_port, orthanc.aet, "DISCUS")
    assert all(r.ok and r.status == 0 for r in results), [str(r.error) for r in results]
    study_uid = dcmread(j2k).StudyInstanceUID
    [stored] = orthanc.instances_of(study_uid)
    syntax = orthanc.get(f"/instances/{stored['OrthancID']}/metadata?expand")["TransferSyntax"]
    assert syntax == JPEG2000Lossless
    assert len(orthanc.instances_of(dcmread(plain[0]).StudyInstanceUID)) == 3
    assert echo("127.0.0.1", orthanc.dicom_port, orthanc.aet) == 0


def test_compressed_file_decompressed_when_peer_wants_uncompressed(peers: list[Peer], tmp_path: Path) -> None:
    peer = Peer([(sop_class.MRImageStorage, [ExplicitVRLittleEndian])])
    peers.append(peer)
    rle = compressed_file(tmp_path, RLELossless, "rle.dcm")
    [res] = send_files([rle], "127.0.0.1", peer.port, "PEER")
    assert res.ok
    [(syntax, ds)] = peer.received
    assert syntax == ExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, dcmread(rle).pixel_array)


def test_unsupported_sop_class_is_permanent(peers: list[Peer], tmp_path: Path) -> None:
    peer = Peer([(sop_class.CTImageStorage, [ExplicitVRLittleEndian])])
    peers.append(peer)
    [mr] = write_stack(tmp_path, 1)
    [res] = send_files([mr], "127.0.0.1", peer.port, "PEER")
    assert res.error is not None and res.error.transient is False
    assert peer.received == []


@pytest.mark.parametrize(("status", "transient"), [(0xA700, True), (0xA7FF, True), (0xA900, False),
                                                   (0xC000, False), (0x0110, False)])
def test_failure_statuses_sorted(peers: list[Peer], tmp_path: Path, status: int, transient: bool) -> None:
    peer = Peer([(sop_class.MRImageStorage, [ExplicitVRLittleEndian])], status=status)
    peers.append(peer)
    paths = write_stack(tmp_path, 2)
    results = send_files(paths, "127.0.0.1", peer.port, "PEER")
    assert [r.status for r in results] == [status, status]
    assert all(r.error is not None and r.error.transient is transient for r in results)
    with pytest.raises(ExportError) as info:
        raise_for_results(results)
    assert info.value.transient is transient and info.value.status == status


def test_warning_is_success(peers: list[Peer], tmp_path: Path) -> None:
    peer = Peer([(sop_class.MRImageStorage, [ExplicitVRLittleEndian])], status=0xB000)
    peers.append(peer)
    results = send_files(write_stack(tmp_path, 1), "127.0.0.1", peer.port, "PEER")
    assert results[0].ok and results[0].status == 0xB000
    raise_for_results(results)  # nothing raised


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    port = free_port()
    results = send_files(write_stack(tmp_path, 2), "127.0.0.1", port, "NOBODY", connection_timeout=2)
    assert all(r.error is not None and r.error.transient for r in results)
    with pytest.raises(ExportError) as info:
        echo("127.0.0.1", port, "NOBODY", timeout=2)
    assert info.value.transient is True


def test_mixed_failures_not_transient(tmp_path: Path) -> None:
    p = tmp_path / "x.dcm"
    results = [
        SendResult(p, "1.2", 0xA700, ExportError("full", transient=True, status=0xA700)),
        SendResult(p, "1.3", 0xC000, ExportError("bad", transient=False, status=0xC000)),
        SendResult(p, "1.4", 0x0000),
    ]
    with pytest.raises(ExportError, match="2 of 3") as info:
        raise_for_results(results)
    assert info.value.transient is False
    assert classify_status(0x0000) is None and classify_status(0xB007) is None


def test_argument_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        send_files([], "127.0.0.1", 0, "X")
    with pytest.raises(ValueError, match="called_aet"):
        send_files([], "127.0.0.1", 104, "")
    with pytest.raises(TypeError, match="transient"):
        ExportError("x", transient="yes")  # type: ignore[arg-type]


def test_stow_and_qido_on_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    paths = write_stack(tmp_path / "s", 2)
    paths.append(compressed_file(tmp_path, RLELossless, "rle.dcm"))
    stored = stow(orthanc.dicomweb_url, paths, timeout=30)
    assert sorted(stored) == sorted(str(dcmread(p).SOPInstanceUID) for p in paths)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    found = qido_instances(orthanc.dicomweb_url, study_uid)
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(str(dcmread(p).SOPInstanceUID) for p in paths[:2])
    assert {i["0020000D"]["Value"][0] for i in found} == {study_uid}
    assert qido(orthanc.dicomweb_url, {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9"}) == []


def test_stow_http_errors_sorted(orthanc: Orthanc, tmp_path: Path) -> None:
    paths = write_stack(tmp_path, 1)
    with pytest.raises(ExportError) as info:
        stow(orthanc.url + "/no-such-dicomweb", paths, timeout=10)
    assert info.value.transient is False and info.value.status == 404
    with pytest.raises(ExportError) as info:
        stow(f"http://127.0.0.1:{free_port()}/dicom-web", paths, timeout=5)
    assert info.value.transient is True and info.value.status is None


def test_stow_server_error_is_transient(tmp_path: Path) -> None:
    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ExportError) as info:
            stow(f"http://127.0.0.1:{server.server_address[1]}/dicom-web", write_stack(tmp_path, 1), timeout=10)
        assert info.value.transient is True and info.value.status == 503
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="url"):
        stow("pacs:8042", [], timeout=1)
    with pytest.raises(ValueError, match="username"):
        stow("http://x", [], username="u")
