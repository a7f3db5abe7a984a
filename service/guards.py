"""ASGI guards in front of every route: who may address the gateway, and how slowly a body may come.

- **Host and Origin.** Without authentication, any page a browser opens could otherwise reach a
  gateway on loopback: by DNS rebinding (a name of the attacker's that now resolves to
  127.0.0.1: the Host header carries that name) or by a cross-site form post (the Origin
  header names the other site). A Host that is not allowed (``Settings.host_allowed``) is
  answered 421; a state-changing request from another origin (Origin, or the browser's
  ``Sec-Fetch-Site: cross-site``) 403, with or without authentication.
- **Upload deadline.** A request body must arrive whole within ``UPLOAD_DEADLINE_S`` and, once
  older than ``BODY_TIMEOUT_S``, at ``UPLOAD_MIN_BYTES_PER_S`` on average; otherwise the
  request ends with 408 (the route's spool folder goes with it). ``BODY_TIMEOUT_S`` alone
  (no data at all for that long) is the route's own check.
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit

from .config import Settings
from .intake import UploadRejected

__all__ = ["RequestGuard"]

log = logging.getLogger("spectdose.service.gateway")

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_name(value: str) -> str:
    """The host of a Host header value (``name``, ``name:port``, ``[v6]:port``)."""
    value = value.strip()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class RequestGuard:
    """Pure ASGI middleware (it wraps ``receive``, so the routes' own streaming stays as it is)."""

    def __init__(self, app, settings: Settings, *, clock=None):
        self.app = app
        self.settings = settings
        self.clock = clock

    async def _answer(self, send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"detail": detail}).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, scope) -> tuple[int, str] | None:
        st = self.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = _host_name(headers.get("host", ""))
        if st.checks_host and not st.host_allowed(host):
            return 421, (f"this gateway does not answer to host {host[:100]!r}: use its address, localhost, or a name "
                         "in SPECTDOSE_ALLOWED_HOSTS")
        if scope["method"] in _SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin) if origin != "null" else None
            same = parts is not None and parts.netloc.lower() == headers.get("host", "").lower()
            if not same and not (parts is not None and _named_origin(st, parts.hostname or "")):
                return 403, f"cross-site request refused: Origin {origin[:100]!r} is not this gateway"
        elif headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-site request refused (Sec-Fetch-Site: cross-site)"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            client = (scope.get("client") or ("?",))[0]
            log.warning("request %s %s from %s refused (%d)", scope["method"], scope.get("path", ""), client, refusal[0])
            return await self._answer(send, *refusal)
        if scope["method"] in _SAFE_METHODS:
            return await self.app(scope, receive, send)
        return await self.app(scope, self._bounded(receive), send)

    def _bounded(self, receive):
        """``receive`` cut off at the upload deadline and below the minimum rate (UploadRejected 408)."""
        st = self.settings
        loop = asyncio.get_running_loop()
        now = self.clock or loop.time
        start = now()
        got = 0

        async def bounded_receive():
            nonlocal got
            remaining = st.upload_deadline_s - (now() - start)
            if remaining <= 0:
                raise _too_slow(f"the request body did not arrive within {st.upload_deadline_s:g} s "
                                "(SPECTDOSE_UPLOAD_DEADLINE_S)")
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                raise _too_slow(f"the request body did not arrive within {st.upload_deadline_s:g} s "
                                "(SPECTDOSE_UPLOAD_DEADLINE_S)") from None
            if message["type"] == "http.request":
                got += len(message.get("body", b""))
                elapsed = now() - start
                if (message.get("more_body") and st.upload_min_bytes_per_s > 0 and elapsed > st.body_timeout_s
                        and got < st.upload_min_bytes_per_s * elapsed):
                    raise _too_slow(f"the request body arrives too slowly ({got} bytes in {elapsed:.0f} s, below "
                                    f"{st.upload_min_bytes_per_s:g} bytes/s, SPECTDOSE_UPLOAD_MIN_BYTES_PER_S)")
            return message

        return bounded_receive


def _named_origin(st: Settings, host: str) -> bool:
    """Another origin the operator named: PUBLIC_URL's host or one of ALLOWED_HOSTS (not merely an
    address or localhost, which any local program's page could be)."""
    host = host.lower().rstrip(".")
    names = {h.lower().rstrip(".") for h in st.allowed_hosts}
    if st.public_url:
        names.add((urlsplit(st.public_url).hostname or "").lower())
    return bool(host) and ("*" in names or host in names
                           or any(n.startswith(".") and (host.endswith(n) or host == n[1:]) for n in names))


def _too_slow(why: str) -> UploadRejected:
    return UploadRejected(408, f"{why}: upload dropped, nothing was stored", headers={"Connection": "close"})
