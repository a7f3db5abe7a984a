"""Uploads are complete or refused (issue 8, items 1 and 6): cut-off multipart and STOW-RS
bodies, a CT with slices missing, a client that stalls or hangs up mid-body.

Each refusal leaves nothing behind: no job, no spool folder, earlier jobs untouched.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pydicom
import pytest
import uvicorn

from service.localredis import free_port
from service.main import create_app

from .support import AUTH, TOKEN, make_settings, wait_for


@pytest.fixture()
def settings(tmp_path, redis_url):
    # Generous: a loaded machine can pause a TestClient upload for more than a second, and only
    # the stall test below waits for the idle limit (it has its own, short one).
    return make_settings(tmp_path / "data", redis_url=redis_url, body_timeout_s=30.0)


@pytest.fixture()
def stall_settings(tmp_path, redis_url):
    return make_settings(tmp_path / "stall", redis_url=redis_url, body_timeout_s=1.0)


def _ordered(files: list[Path]) -> list[Path]:
    """The SPECT first, then the CT slices: a cut at the end loses CT slices, as in the issue."""
    return sorted(files, key=lambda p: (pydicom.dcmread(p, stop_before_pixels=True).Modality != "NM", p.name))


def _stow(files: list[Path], boundary: str, *, close: bool = True) -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
                    for p in files)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def _form(files: list[Path], boundary: str, *, close: bool = True) -> bytes:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{p.name}"\r\n'
        f"Content-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in files)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def _nothing_left(settings) -> None:
    assert not any((settings.data_dir / "uploads").iterdir()), "the spool folder was not discarded"
    assert not any((settings.data_dir / "jobs").iterdir()), "a refused upload created a job folder"


def _no_jobs(client) -> None:
    assert client.get("/jobs", headers=AUTH).json()["total"] == 0


@pytest.mark.parametrize("kind", ["stow-rs", "form-data"])
def test_cut_off_multipart_body_is_400_not_a_smaller_study(client, settings, phantom_files, kind):
    files = _ordered(phantom_files)
    assert len(files) == 65
    boundary = uuid.uuid4().hex
    build, ctype = (_stow, f'multipart/related; type="application/dicom"; boundary={boundary}') if kind == "stow-rs" \
        else (_form, f"multipart/form-data; boundary={boundary}")
    body = build(files[:55], boundary, close=False)  # 55 of 65 parts, then the connection ends
    r = client.post("/studies", content=body, headers={**AUTH, "Content-Type": ctype})
    assert r.status_code == 400, r.text
    assert "closing boundary" in r.json()["detail"] and "cut off" in r.json()["detail"]
    _nothing_left(settings)
    _no_jobs(client)
    refused = client.app.state.ctx.store.audit_events(action="upload_rejected")
    assert len(refused) == 1 and refused[0].detail["status"] == 400
    # the whole body, closing delimiter included, is accepted
    r = client.post("/studies", content=build(files, boundary), headers={**AUTH, "Content-Type": ctype})
    assert r.status_code in (200, 202), r.text[:300]  # STOW-RS answers with its own store response
    jobs = client.get("/jobs", headers=AUTH).json()["jobs"]
    assert len(jobs) == 1 and jobs[0]["files"] == 65, jobs


def test_ct_with_a_slice_missing_inside_is_422(client, settings, phantom_dir):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted((phantom_dir / "dicom").rglob("*.dcm")):
            if p.parent.name == "CT" and p.name == "CT_0030.dcm":
                continue  # lost on the way
            zf.write(p, p.relative_to(phantom_dir).as_posix())
    r = client.post("/studies", content=buf.getvalue(), headers={**AUTH, "Content-Type": "application/zip"})
    assert r.status_code == 422, r.text
    assert "incomplete study" in r.json()["detail"] and "1 slice(s) missing" in r.json()["detail"]
    _nothing_left(settings)
    _no_jobs(client)


def test_nm_frames_not_matching_its_slices_is_422(client, settings, phantom_files, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, p in enumerate(phantom_files):
            ds = pydicom.dcmread(p)
            if ds.Modality == "NM":
                ds.NumberOfFrames = int(ds.NumberOfFrames) + 12  # header promises frames the pixel data lacks
                p = tmp_path / "nm.dcm"
                ds.save_as(p)
            zf.write(p, f"{i:03d}.dcm")
    r = client.post("/studies", content=buf.getvalue(), headers={**AUTH, "Content-Type": "application/zip"})
    assert r.status_code == 422 and "frames" in r.json()["detail"], r.text[:300]
    _nothing_left(settings)


# ------------------------------------------------------------------ clients that stall or hang up


def _serve(settings):
    """The gateway on a real socket (uvicorn in a thread), logging through the root logger."""
    app = create_app(settings, sweeper=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 15, what="uvicorn")
    yield port, app
    server.should_exit = True
    thread.join(timeout=15)


@pytest.fixture()
def live(settings):
    yield from _serve(settings)


@pytest.fixture()
def live_stall(stall_settings):
    yield from _serve(stall_settings)


def _headers(length: int) -> bytes:
    return (f"POST /studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/zip\r\nContent-Length: {length}\r\n\r\n").encode()


def test_headers_without_a_body_are_dropped_after_the_body_timeout(live_stall, stall_settings):
    port, app = live_stall
    settings = stall_settings
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(_headers(100_000) + b"PK\x03\x04")  # a few bytes, then nothing
        start = time.monotonic()
        reply = s.recv(65536).decode(errors="replace")
        waited = time.monotonic() - start
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert 0.5 < waited < 10, waited
    assert not any((settings.data_dir / "uploads").iterdir())
    refused = app.state.ctx.store.audit_events(action="upload_rejected")
    assert len(refused) == 1 and refused[0].detail["status"] == 408


def test_client_disconnect_is_one_audit_event_and_no_traceback(live, settings, caplog):
    port, app = live
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(_headers(1_000_000) + b"PK\x03\x04" + b"\0" * 5000)
        time.sleep(0.3)
    store = app.state.ctx.store
    wait_for(lambda: store.audit_events(action="upload_disconnected"), 10, what="the disconnect audit event")
    time.sleep(0.5)
    assert len(store.audit_events(action="upload_disconnected")) == 1
    assert not store.audit_events(action="upload_rejected")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any((settings.data_dir / "uploads").iterdir())
