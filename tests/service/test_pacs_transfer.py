"""Compressed results where the receiver takes them (issue 20): C-STORE proposes lossless syntaxes per
association and sends each object in the best one the peer accepted; a peer that accepts only
uncompressed syntaxes gets the same objects uncompressed. Both store the same dose. STOW-RS sends
each part compressed and, to an origin server that refuses that, uncompressed."""

from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    ParametricMapStorage,
    RTDoseStorage,
)
from pynetdicom import AE, evt

from service.config import DicomPeer
from service.export import OutputFile, c_store, stow_rs
from service.localredis import free_port
from spectdose.dicom.export import (
    read_dose_rate_map,
    read_rtdose,
    write_dose_rate_map,
    write_rtdose,
)
from spectdose.geometry import Volume
from tests.test_export import DESCRIPTION, dose_pattern_gy, make_study

LOSSLESS_AND_PLAIN = [JPEGLSLossless, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class Receiver:
    """A C-STORE SCP for RT Dose and Parametric Maps that accepts the given transfer syntaxes and keeps
    what arrived, with the syntax it arrived in."""

    def __init__(self, folder: Path, syntaxes: list[str]):
        self.folder, self.syntaxes, self.port = folder, syntaxes, free_port()
        self.received: list[tuple[str, Path]] = []
        self._lock = threading.Lock()

    def _on_store(self, event) -> int:
        path = self.folder / f"{event.dataset.SOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        with self._lock:
            self.received.append((str(event.context.transfer_syntax), path))
        return 0x0000

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="RECEIVER")
        ae.add_supported_context(RTDoseStorage, self.syntaxes)
        ae.add_supported_context(ParametricMapStorage, self.syntaxes)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc):
        self._server.shutdown()

    @property
    def peer(self) -> DicomPeer:
        return DicomPeer("RECEIVER", "127.0.0.1", self.port)


@pytest.fixture(scope="module")
def doses(tmp_path_factory) -> list[OutputFile]:
    """A 16-bit and a 32-bit RT Dose of the same dose."""
    folder = tmp_path_factory.mktemp("doses")
    study = make_study()
    files = []
    for bits in (16, 32):
        path = write_rtdose(folder / f"d{bits}.dcm", dose_pattern_gy(study), study, method="DVK",
                            description=DESCRIPTION, bits=bits)
        header = pydicom.dcmread(path, stop_before_pixels=True)
        files.append(OutputFile("rtdose", path, str(header.SOPInstanceUID), str(header.SOPClassUID)))
    return files


def _send(receiver: Receiver, files: list[OutputFile]) -> dict[str, str | None]:
    return c_store(receiver.peer, files, calling_aet="SPECTDOSE", timeout_s=30)


def test_compressed_where_accepted_uncompressed_where_not_same_dose(tmp_path, doses):
    with Receiver(tmp_path / "takes", LOSSLESS_AND_PLAIN) as takes:
        sent_to_takes = _send(takes, doses)
    with Receiver(tmp_path / "plain", [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as plain:
        sent_to_plain = _send(plain, doses)

    assert set(sent_to_takes.values()) == {None} and set(sent_to_plain.values()) == {None}
    by_uid = {f.sop_instance_uid: f for f in doses}
    arrived_in = {pydicom.dcmread(p, stop_before_pixels=True).BitsAllocated: ts for ts, p in takes.received}
    # 16 bits: JPEG-LS; 32 bits (beyond JPEG-LS): deflated; the peer without them: uncompressed.
    assert arrived_in == {16: JPEGLSLossless, 32: DeflatedExplicitVRLittleEndian}
    assert {ts for ts, _ in plain.received} <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    for receiver in (takes, plain):
        assert len(receiver.received) == 2
        for _, path in receiver.received:
            stored = pydicom.dcmread(path)
            original = pydicom.dcmread(by_uid[str(stored.SOPInstanceUID)].path)
            assert stored.DoseGridScaling == original.DoseGridScaling
            assert np.array_equal(stored.pixel_array, original.pixel_array), "lossless: the same stored dose"
            assert np.array_equal(read_rtdose(path).array, read_rtdose(by_uid[str(stored.SOPInstanceUID)].path).array)
    compressed = next(p for ts, p in takes.received if ts == JPEGLSLossless)
    uncompressed = next(p for _, p in plain.received if pydicom.dcmread(p, stop_before_pixels=True).BitsAllocated == 16)
    assert compressed.stat().st_size < uncompressed.stat().st_size


@pytest.fixture(scope="module")
def rate_map(tmp_path_factory) -> OutputFile:
    """A 16-bit dose-rate map, stored JPEG-LS as the pipeline writes it."""
    study = make_study()
    dose = dose_pattern_gy(study)
    path = write_dose_rate_map(tmp_path_factory.mktemp("map") / "pm16.dcm", Volume(dose.array, dose.grid, "mGy/h"),
                               study, method="DVK", bits=16)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert str(header.file_meta.TransferSyntaxUID) == JPEGLSLossless
    return OutputFile("doserate", path, str(header.SOPInstanceUID), str(header.SOPClassUID))


def test_a_map_stored_compressed_goes_as_stored_or_decoded(tmp_path, rate_map):
    with Receiver(tmp_path / "takes", LOSSLESS_AND_PLAIN) as takes:
        sent_to_takes = _send(takes, [rate_map])
    with Receiver(tmp_path / "plain", [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as plain:
        sent_to_plain = _send(plain, [rate_map])

    assert sent_to_takes == sent_to_plain == {rate_map.sop_instance_uid: None}
    ((takes_syntax, took), (plain_syntax, plain_got)) = takes.received + plain.received
    assert takes_syntax == JPEGLSLossless and plain_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    for path in (took, plain_got):
        assert np.array_equal(pydicom.dcmread(path).pixel_array, pydicom.dcmread(rate_map.path).pixel_array)
        assert np.array_equal(read_dose_rate_map(path).array, read_dose_rate_map(rate_map.path).array)


class _Stow(http.server.BaseHTTPRequestHandler):
    """A STOW-RS origin server; ``plain_only`` answers 415 to any part in a compressed syntax."""

    plain_only = False
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
        parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
        received = []
        for part in parts:
            head, data = part.split(b"\r\n\r\n", 1)
            ds = pydicom.dcmread(io.BytesIO(data[:-2]))
            received.append((head.decode(), str(ds.file_meta.TransferSyntaxUID), ds))
        type(self).requests.append(received)
        compressed = any(ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) for _, ts, _ in received)
        self.send_response(415 if compressed and type(self).plain_only else 200)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("plain_only", [False, True])
def test_stow_rs_compressed_unless_the_server_refuses_it(doses, plain_only):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Stow.plain_only, _Stow.requests = plain_only, []
    try:
        result = stow_rs(f"http://127.0.0.1:{server.server_port}", doses, token=None, timeout_s=30)
    finally:
        server.shutdown()

    assert set(result.values()) == {None}
    first = _Stow.requests[0]
    assert {ts for _, ts, _ in first} == {JPEGLSLossless, DeflatedExplicitVRLittleEndian}
    assert all(f"transfer-syntax={ts}" in head for head, ts, _ in first), "each part names its syntax"
    assert len(_Stow.requests) == (2 if plain_only else 1)
    stored = _Stow.requests[-1]
    if plain_only:
        assert {ts for _, ts, _ in stored} == {ExplicitVRLittleEndian}
    by_uid = {f.sop_instance_uid: f for f in doses}
    for _, _, ds in stored:
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(by_uid[str(ds.SOPInstanceUID)].path).pixel_array)


def test_stow_rs_sends_a_map_stored_compressed_uncompressed_when_refused(rate_map):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Stow.plain_only, _Stow.requests = True, []
    try:
        result = stow_rs(f"http://127.0.0.1:{server.server_port}", [rate_map], token=None, timeout_s=30)
    finally:
        server.shutdown()

    assert result == {rate_map.sop_instance_uid: None}
    [(_, first_syntax, _)], [(_, second_syntax, ds)] = _Stow.requests
    assert (first_syntax, second_syntax) == (JPEGLSLossless, ExplicitVRLittleEndian)
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(rate_map.path).pixel_array)
