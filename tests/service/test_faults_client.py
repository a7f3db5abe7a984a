"""Client faults and exposure (issue 8, item 6): failed logins audited and throttled per
client, /docs behind the token in production, the embedded Redis with a password, the
worker image not running as root, HTTPS through uvicorn's TLS options.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.cli import _tls
from service.localredis import ensure_redis, free_port, redacted, redis_answers
from service.main import create_app
from service.throttle import LoginThrottle

from .support import AUTH, TOKEN, make_settings

ROOT = Path(__file__).resolve().parents[2]


def test_failed_logins_are_audited_then_throttled_per_client(tmp_path, redis_url):
    settings = make_settings(tmp_path / "data", redis_url=redis_url, auth_max_failures=3, auth_failure_window_s=60)
    with TestClient(create_app(settings, sweeper=False)) as c:
        bad = {"Authorization": "Bearer wrong-token-0000000000"}
        assert [c.get("/jobs", headers=bad).status_code for _ in range(3)] == [401, 401, 401]
        r = c.get("/jobs", headers=bad)
        assert r.status_code == 429, "a wrong token from a throttled client waits"
        assert 0 < int(r.headers["Retry-After"]) <= 60 and "too many failed logins" in r.json()["detail"]
        assert c.get("/health").status_code == 200, "monitoring needs no token and is never throttled"
        store = c.app.state.ctx.store
        failed = store.audit_events(action="auth_failed")
        assert len(failed) == 3 and all(e.remote_host == "testclient" for e in failed)
        assert len(store.audit_events(action="auth_throttled")) == 1
        assert "wrong-token" not in "".join(repr(e.detail) for e in failed), "the offered token is never stored"


def test_eleven_wrong_tokens_do_not_lock_out_the_clinic(tmp_path, redis_url):
    """Issue 19 case 8: eleven wrong tokens from one address (a NAT, a proxy); the valid token and the
    page login from that address still work, and the lock ends with its window (it does not renew)."""
    settings = make_settings(tmp_path / "data", redis_url=redis_url)  # the defaults: 10 failures in 300 s
    now = [1000.0]
    with TestClient(create_app(settings, sweeper=False)) as c:
        c.app.state.login_throttle = LoginThrottle(settings.auth_max_failures, settings.auth_failure_window_s,
                                                   clock=lambda: now[0])
        bad = {"Authorization": "Bearer wrong-token-0000000000"}
        codes = []
        for _ in range(11):
            codes.append(c.get("/jobs", headers=bad).status_code)
            now[0] += 1
        assert codes == [401] * 10 + [429]
        assert c.get("/jobs", headers=AUTH).status_code == 200, "a valid token passes a throttled address"
        r = c.post("/ui/login", data={"token": TOKEN, "next": "/ui/jobs"}, follow_redirects=False)
        assert r.status_code == 303 and "spectdose_session=" in r.headers["set-cookie"], "the page login works too"
        r = c.post("/ui/login", data={"token": "wrong-token-0000000000"}, follow_redirects=False)
        assert r.status_code == 429 and "retry in" in r.text, "a wrong one at the form still waits"
        # the bad script keeps going during the lock: its refusals are not counted, so the lock ends
        for _ in range(50):
            assert c.get("/jobs", headers=bad).status_code == 429
            now[0] += 1
        now[0] = 1000.0 + settings.auth_failure_window_s + 1
        assert c.get("/jobs", headers=bad).status_code == 401, "the lock ended with its window, not renewed"


def test_throttle_window_and_other_clients():
    now = [0.0]
    t = LoginThrottle(2, 10, clock=lambda: now[0])
    t.failed("a")
    t.failed("a")
    assert t.retry_after("a") == 10 and t.retry_after("b") is None
    now[0] = 10.5
    assert t.retry_after("a") is None, "failures age out of the window"
    t.failed("a")
    t.succeeded("a")
    assert t.retry_after("a") is None


@pytest.mark.parametrize("environment,auth,mode,anonymous,with_token", [
    ("production", True, None, 401, 200),
    ("development", True, None, 401, 200),  # serve with tokens (issue 19 case 12): docs follow the token
    ("development", False, None, 200, 200),  # the open local demo
    ("production", True, "public", 200, 200),
    ("production", True, "off", 404, 404),
])
def test_docs_and_openapi_are_protected_in_production(tmp_path, redis_url, environment, auth, mode, anonymous,
                                                      with_token):
    kw = {"api_docs": mode} if mode else {}
    settings = make_settings(tmp_path / "data", redis_url=redis_url, environment=environment, auth_enabled=auth, **kw)
    with TestClient(create_app(settings, sweeper=False), base_url="http://127.0.0.1") as c:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert c.get(path).status_code == anonymous, path
            assert c.get(path, headers=AUTH).status_code == with_token, path
        if with_token == 200:
            assert "/studies" in c.get("/openapi.json", headers=AUTH).json()["paths"]


def test_embedded_redis_has_a_generated_password(tmp_path):
    if not Path("/usr/bin/redis-server").exists() and not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    port = free_port()
    url, local = ensure_redis(f"redis://127.0.0.1:{port}/0", tmp_path / "redis")
    try:
        assert local is not None and local.password and f":{local.password}@" in url
        assert redis_answers(url)
        assert not redis_answers(f"redis://127.0.0.1:{port}/0"), "no access without the password"
        cmdline = Path(f"/proc/{local.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert local.password not in cmdline, "the password is not visible in ps"
        for name in ("redis.conf", "url"):
            mode = stat.S_IMODE(os.stat(tmp_path / "redis" / name).st_mode)
            assert mode == 0o600, (name, oct(mode))
        assert (tmp_path / "redis" / "url").read_text().strip() == url
        assert local.password not in redacted(url) and "***" in redacted(url)
    finally:
        local.stop()


def test_worker_image_does_not_run_as_root():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), "the last USER of the image is not root"
    assert re.search(r"useradd .*--uid 10001", text)
    entry = text.index("ENTRYPOINT")
    assert text.rindex("USER") < entry, "the service (gateway, node, worker) starts as that user"


def test_tls_options_reach_uvicorn(tmp_path):
    assert _tls(make_settings(tmp_path)) == {}
    s = make_settings(tmp_path, tls_certfile=tmp_path / "c.pem", tls_keyfile=tmp_path / "k.pem")
    assert _tls(s) == {"ssl_certfile": str(tmp_path / "c.pem"), "ssl_keyfile": str(tmp_path / "k.pem")}
    with pytest.raises(ValueError, match="go together"):
        make_settings(tmp_path, tls_certfile=tmp_path / "c.pem")
