"""FastAPI dependencies as ``Annotated`` aliases: the service context and the caller's identity.

API clients send ``Authorization: Bearer <token>``; a browser logs in once with the same token
(``POST /ui/login``) and then carries a signed session cookie (:func:`make_session`): HttpOnly,
SameSite=Strict, Secure over TLS, and never the token itself.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .context import ServiceContext
from .jobs import token_label
from .storage import atomic_write_bytes
from .throttle import LoginThrottle

__all__ = ["ServiceContext", "Ctx", "Actor", "public_base_url", "job_or_404", "get_context", "require_token", "check_token", "make_session",
           "session_actor", "revoke_session", "require_session", "Viewer", "SESSION_COOKIE", "SESSION_MAX_AGE_S"]

_bearer = HTTPBearer(auto_error=False, description="one of SPECTDOSE_API_TOKENS")

SESSION_COOKIE = "spectdose_session"
# A browser session lasts a working day; then the token is asked for again.
SESSION_MAX_AGE_S = 8 * 3600
_SESSION_KEY_FILE = "ui-session.key"
_REVOKED_DIR = "ui-sessions-revoked"  # one file per logged-out session (its nonce), until it expires
_NONCE = re.compile(r"[0-9a-f]{16,64}")


def get_context(request: Request) -> ServiceContext:
    return request.app.state.ctx


def public_base_url(request: Request, ctx: ServiceContext) -> str:
    """The base of links in answers: the configured public URL, else none (links stay relative).

    Never the request's Host header: behind a proxy or under DNS rebinding it names someone else.
    """
    return ctx.settings.public_url.rstrip("/") if ctx.settings.public_url else ""


def job_or_404(ctx: ServiceContext, job_id: str):
    """The job, or 404 (an id that cannot be one is not looked up)."""
    job = ctx.store.get(job_id) if len(job_id) == 32 else None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def check_token(request: Request, offered: str | None) -> str:
    """The audit label of ``offered`` if it is one of the API tokens; else 401 (or 429 while this
    client is throttled), audited. One check for the API and the login form.

    A valid token always passes, even from a throttled address: behind a NAT or a proxy one
    bad script must not lock the clinic out. Failures while throttled are answered 429 and not
    counted again, so the lock ends when its window does (it does not renew itself).
    """
    ctx: ServiceContext = request.app.state.ctx
    settings = ctx.settings
    client = request.client.host if request.client else "?"
    if offered:
        for token in settings.api_tokens:
            if hmac.compare_digest(token.encode(), offered.encode()):
                return token_label(token)
    throttle: LoginThrottle | None = getattr(request.app.state, "login_throttle", None)
    wait = throttle.retry_after(client) if throttle else None
    if wait is not None:
        raise HTTPException(status_code=status.HTTP_429_TOO_MANY_REQUESTS,
                            detail=f"too many failed logins from this client: retry in {wait} s (a valid token "
                                   "is still accepted)",
                            headers={"Retry-After": str(wait)})
    if throttle:
        n = throttle.failed(client)
        # Audited up to the limit, then once as throttled: a guesser cannot flood the audit log.
        if n <= settings.auth_max_failures:
            ctx.store.audit("?", "auth_failed", remote_host=client, path=request.url.path,
                            had_token=offered is not None)
        if n == settings.auth_max_failures:
            ctx.store.audit("?", "auth_throttled", remote_host=client, failures=n,
                            window_s=settings.auth_failure_window_s)
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API token: send 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's audit label; 401 without a valid ``Authorization: Bearer <token>``."""
    if not request.app.state.ctx.settings.auth_enabled:
        return "anonymous"
    offered = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
    return check_token(request, offered)


def _session_key(ctx: ServiceContext) -> bytes:
    """The key that signs browser sessions: random, made once per data directory (0600), so
    every gateway on that directory accepts the others' sessions and a restart keeps them."""
    path = Path(ctx.settings.data_dir) / _SESSION_KEY_FILE
    cache = ctx.__dict__.setdefault("_ui_session_key", {})
    if path in cache:
        return cache[path]
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
    for _ in range(50):  # another gateway may be writing it right now
        key = path.read_bytes()
        if len(key) == 32:
            cache[path] = key
            return key
        time.sleep(0.01)
    raise RuntimeError(f"{path} is not a 32-byte session key: remove it to make a new one")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _token_fingerprint(key: bytes, token: str) -> str:
    return hmac.new(key, b"token\x00" + token.encode(), hashlib.sha256).hexdigest()[:32]


def make_session(request: Request, token: str, *, now: float | None = None) -> str:
    """A session cookie value for a checked ``token``: who, until when, and a keyed fingerprint
    of the token (so removing the token from SPECTDOSE_API_TOKENS ends its sessions), signed
    with HMAC-SHA256. The token itself is not in it."""
    ctx: ServiceContext = request.app.state.ctx
    key = _session_key(ctx)
    payload = {"l": token_label(token), "f": _token_fingerprint(key, token),
               "e": int((now or time.time()) + SESSION_MAX_AGE_S), "n": secrets.token_hex(8)}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{body}.{_b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def _session_payload(request: Request, *, now: float | None = None) -> dict | None:
    """The checked payload of the request's session cookie, else None (absent, forged, expired,
    its token removed, logged out)."""
    ctx: ServiceContext = request.app.state.ctx
    value = request.cookies.get(SESSION_COOKIE)
    if not value or value.count(".") != 1:
        return None
    body, signature = value.split(".")
    key = _session_key(ctx)
    if not hmac.compare_digest(_b64(hmac.new(key, body.encode(), hashlib.sha256).digest()), signature):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        expires, fingerprint, nonce = int(payload["e"]), str(payload["f"]), str(payload["n"])
        str(payload["l"])
    except (ValueError, KeyError, TypeError):
        return None
    if expires < (now or time.time()) or not _NONCE.fullmatch(nonce):
        return None
    if not any(hmac.compare_digest(_token_fingerprint(key, t), fingerprint) for t in ctx.settings.api_tokens):
        return None
    if (_revoked_dir(ctx) / nonce).exists():
        return None
    return payload


def session_actor(request: Request, *, now: float | None = None) -> str | None:
    """The audit label of a valid session cookie, else None (absent, forged, expired, revoked)."""
    if not request.app.state.ctx.settings.auth_enabled:
        return "anonymous"
    payload = _session_payload(request, now=now)
    return None if payload is None else str(payload["l"])


def _revoked_dir(ctx: ServiceContext) -> Path:
    return Path(ctx.settings.data_dir) / _REVOKED_DIR


def revoke_session(request: Request, *, now: float | None = None) -> str | None:
    """End the request's session on the server (logout): its nonce is recorded under the data
    directory, which every gateway on it reads, until the cookie would have expired anyway.
    Returns the session's audit label, or None when there was no valid session."""
    ctx: ServiceContext = request.app.state.ctx
    payload = _session_payload(request, now=now)
    if payload is None:
        return None
    folder = _revoked_dir(ctx)
    folder.mkdir(mode=0o700, exist_ok=True)
    atomic_write_bytes(folder / str(payload["n"]), str(int(payload["e"])).encode())
    t = now or time.time()
    for old in folder.iterdir():  # revocations of sessions that have expired anyway
        with contextlib.suppress(OSError, ValueError):
            if not old.name.startswith(".") and int(old.read_text()) < t:
                old.unlink()
    return str(payload["l"])


def require_session(request: Request) -> str:
    """The browser's audit label; 401 without a valid session cookie (pictures and data of /ui)."""
    actor = session_actor(request)
    if actor is None:
        raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail="not logged in: log in at /ui/login")
    return actor


Ctx = Annotated[ServiceContext, Depends(get_context)]
Actor = Annotated[str, Depends(require_token)]
Viewer = Annotated[str, Depends(require_session)]
