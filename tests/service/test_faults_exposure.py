"""A gateway closed unless told (issue 19, cases 6, 10, 11): Host and Origin checked, Location from
the configured public URL only, uploads with an overall deadline and a minimum rate, sessions that
end at logout.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import pytest
import uvicorn
from fastapi.testclient import TestClient

from service.localredis import free_port
from service.main import create_app

from .support import AUTH, TOKEN, make_settings, wait_for


def _open(tmp_path, redis_url, **kw):
    """The open local gateway of `serve` without tokens (development, loopback, no authentication)."""
    return make_settings(tmp_path / "data", redis_url=redis_url, environment="development", auth_enabled=False, **kw)


def _nothing_stored(settings) -> None:
    assert not any((settings.data_dir / "uploads").iterdir()), "the spool folder was not removed"
    assert not any((settings.data_dir / "jobs").iterdir()), "a refused request created a job"


# ------------------------------------------------------------------ case 6: Host, Origin, Location


def test_dns_rebinding_and_cross_site_posts_fail_on_the_open_gateway(tmp_path, redis_url, study_zip):
    settings = _open(tmp_path, redis_url)
    with TestClient(create_app(settings, sweeper=False), base_url="http://127.0.0.1:8000") as c:
        # DNS rebinding: the attacker's name now resolves to 127.0.0.1, the browser sends it as Host
        r = c.get("/jobs", headers={"Host": "rebind.evil.example:8000"})
        assert r.status_code == 421 and "does not answer to host" in r.json()["detail"]
        assert c.get("/ui/jobs", headers={"Host": "rebind.evil.example"}).status_code == 421
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
            assert c.get("/jobs", headers={"Host": host}).status_code == 200, host
        # a cross-site form post from a page of another site
        zipped = {"Content-Type": "application/zip"}
        r = c.post("/studies", content=study_zip, headers={**zipped, "Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-site" in r.json()["detail"], r.text
        r = c.post("/studies", content=study_zip, headers={**zipped, "Origin": "null"})
        assert r.status_code == 403
        r = c.post("/studies", content=study_zip, headers={**zipped, "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        assert c.post("/ui/logout", headers={"Origin": "http://evil.example"}).status_code == 403
        _nothing_stored(settings)
        # the page's own posts (same origin) and clients without an Origin (curl, scripts) pass
        r = c.post("/studies", content=study_zip, headers={**zipped, "Origin": "http://127.0.0.1:8000"})
        assert r.status_code == 202, r.text[:300]
        job_id = r.json()["job_id"]
        assert r.headers["location"] == f"/jobs/{job_id}", "relative without PUBLIC_URL, never the Host header"
        assert c.get(r.headers["location"]).json()["job_id"] == job_id


def test_allowed_hosts_and_public_url(tmp_path, redis_url, study_zip):
    settings = make_settings(tmp_path / "data", redis_url=redis_url, allowed_hosts=["dosimetry.example.org"],
                             public_url="https://dosimetry.example.org/api")
    with TestClient(create_app(settings, sweeper=False), base_url="https://dosimetry.example.org") as c:
        assert c.get("/jobs", headers=AUTH).status_code == 200
        assert c.get("/jobs", headers={**AUTH, "Host": "other.example.org"}).status_code == 421
        r = c.post("/studies", content=study_zip, headers={**AUTH, "Content-Type": "application/zip",
                                                           "Origin": "https://dosimetry.example.org"})
        assert r.status_code == 202, r.text[:300]
        assert r.headers["location"] == f"https://dosimetry.example.org/api/jobs/{r.json()['job_id']}"


def test_location_never_comes_from_the_host_header(tmp_path, redis_url, study_zip):
    settings = make_settings(tmp_path / "data", redis_url=redis_url)  # tokens, no PUBLIC_URL: Host not checked
    with TestClient(create_app(settings, sweeper=False)) as c:
        r = c.post("/studies", content=study_zip,
                   headers={**AUTH, "Content-Type": "application/zip", "Host": "evil.example"})
        assert r.status_code == 202, r.text[:300]
        assert "evil" not in r.headers["location"] and r.headers["location"].startswith("/jobs/")
        job = c.get(r.headers["location"], headers={**AUTH, "Host": "evil.example"}).json()
        assert not any("evil" in str(v) for v in job.get("links", {}).values())


# ------------------------------------------------------------------ case 10: slow uploads


@pytest.fixture()
def live(tmp_path, redis_url):
    def start(**kw):
        settings = make_settings(tmp_path / "data", redis_url=redis_url, **kw)
        app = create_app(settings, sweeper=False)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, 15, what="uvicorn")
        servers.append((server, thread))
        return settings, app, port

    servers = []
    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=15)


def _trickle(port: int, path: str, ctype: str, every_s: float, chunk: bytes, max_s: float) -> tuple[str, float]:
    """Send headers, then ``chunk`` every ``every_s`` until the server answers; (reply, seconds)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: 100000000\r\n\r\n").encode()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=max_s) as s:
        s.sendall(head)
        s.settimeout(every_s)
        while time.monotonic() - start < max_s:
            try:
                reply = s.recv(65536)
                if reply:
                    took = time.monotonic() - start
                    s.settimeout(5)
                    with contextlib.suppress(OSError):  # the server closes (or resets) once it has answered
                        while more := s.recv(65536):  # the body may follow the headers in another packet
                            reply += more
                    return reply.decode(errors="replace"), took
            except TimeoutError:
                pass
            try:
                s.sendall(chunk)
            except OSError:
                break
        s.settimeout(5)
        reply = b""
        with contextlib.suppress(OSError):
            while more := s.recv(65536):
                reply += more
        return reply.decode(errors="replace"), time.monotonic() - start


def test_one_byte_every_5_s_is_cut_off(live):
    """The issue's client: 1 byte every 5 s never trips the idle limit; the minimum rate cuts it."""
    settings, app, port = live(body_timeout_s=8.0, upload_min_bytes_per_s=1024)
    reply, took = _trickle(port, "/studies", "application/zip", 5.0, b"P", max_s=40)
    assert reply.startswith("HTTP/1.1 408"), reply[:300]
    assert "too slowly" in reply and "UPLOAD_MIN_BYTES_PER_S" in reply
    assert 8 <= took < 20, took
    assert not any((settings.data_dir / "uploads").iterdir()), "the spool folder is removed"
    refused = app.state.ctx.store.audit_events(action="upload_rejected")
    assert len(refused) == 1 and refused[0].detail["status"] == 408


def test_the_overall_upload_deadline_holds_for_regions_too(live):
    settings, app, port = live(body_timeout_s=30.0, upload_min_bytes_per_s=0, upload_deadline_s=3.0)
    reply, took = _trickle(port, "/studies", "application/zip", 0.2, b"\0" * 512, max_s=30)
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 3 s" in reply, reply[:300]
    assert 2.5 <= took < 10, took
    store = app.state.ctx.store
    job_id = uuid.uuid4().hex
    store.create_job(job_id, source="rest", submitted_by="token:x", options={"method": "dvk"}, export=[],
                     queue="cpu", n_files=1)
    reply, took = _trickle(port, f"/jobs/{job_id}/regions", "application/dicom", 0.2, b"\0" * 512, max_s=30)
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 3 s" in reply, reply[:300]
    assert not any((settings.data_dir / "uploads").iterdir())
    assert not (settings.data_dir / "jobs" / job_id / "regions").exists()


# ------------------------------------------------------------------ case 11: logout


def test_logout_ends_the_session_on_the_server(tmp_path, redis_url):
    settings = make_settings(tmp_path / "data", redis_url=redis_url)
    app = create_app(settings, sweeper=False)
    unknown = "0" * 32
    with TestClient(app) as browser:
        r = browser.post("/ui/login", data={"token": TOKEN, "next": "/ui/jobs"}, follow_redirects=False)
        assert r.status_code == 303
        cookie = browser.cookies.get("spectdose_session")
        assert cookie and browser.get("/ui/jobs").status_code == 200
        # the session opens the results (an unknown job: 404, not 401)
        assert browser.get(f"/ui/jobs/{unknown}/report.pdf").status_code == 404
        assert browser.post("/ui/logout", follow_redirects=False).status_code == 303
    with TestClient(app) as thief:  # a copy of the old cookie, e.g. from the browser's profile
        thief.cookies.set("spectdose_session", cookie, path="/ui")
        r = thief.get("/ui/jobs", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login"), "the page is closed"
        assert thief.get(f"/ui/jobs/{unknown}/report.pdf").status_code == 401, "so is report.pdf"
    with TestClient(create_app(settings, sweeper=False)) as other_gateway:  # same data directory
        other_gateway.cookies.set("spectdose_session", cookie, path="/ui")
        assert other_gateway.get(f"/ui/jobs/{unknown}/report.pdf").status_code == 401
        assert len(app.state.ctx.store.audit_events(action="ui_logout")) == 1
        r = other_gateway.post("/ui/login", data={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303 and other_gateway.get("/ui/jobs").status_code == 200, "a new login works"
