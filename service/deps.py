"""FastAPI dependencies as ``Annotated`` aliases: the service context and the caller's identity."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .context import ServiceContext
from .jobs import token_label
from .throttle import LoginThrottle

__all__ = ["ServiceContext", "Ctx", "Actor", "get_context", "require_token"]

_bearer = HTTPBearer(auto_error=False, description="one of SPECTDOSE_API_TOKENS")


def get_context(request: Request) -> ServiceContext:
    return request.app.state.ctx


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's audit label; 401 without a valid ``Authorization: Bearer <token>``."""
    ctx: ServiceContext = request.app.state.ctx
    settings = ctx.settings
    if not settings.auth_enabled:
        return "anonymous"
    client = request.client.host if request.client else "?"
    throttle: LoginThrottle | None = getattr(request.app.state, "login_throttle", None)
    wait = throttle.retry_after(client) if throttle else None
    if wait is not None:
        raise HTTPException(status_code=status.HTTP_429_TOO_MANY_REQUESTS,
                            detail=f"too many failed logins from this client: retry in {wait} s",
                            headers={"Retry-After": str(wait)})
    if credentials is not None and credentials.scheme.lower() == "bearer":
        offered = credentials.credentials.encode()
        for token in settings.api_tokens:
            if hmac.compare_digest(token.encode(), offered):
                if throttle:
                    throttle.succeeded(client)
                return token_label(token)
    if throttle:
        n = throttle.failed(client)
        # Audited up to the limit, then once as throttled: a guesser cannot flood the audit log.
        if n <= settings.auth_max_failures:
            ctx.store.audit("?", "auth_failed", remote_host=client, path=request.url.path,
                            had_token=credentials is not None)
        if n == settings.auth_max_failures:
            ctx.store.audit("?", "auth_throttled", remote_host=client, failures=n,
                            window_s=settings.auth_failure_window_s)
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API token: send 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


Ctx = Annotated[ServiceContext, Depends(get_context)]
Actor = Annotated[str, Depends(require_token)]
