"""FastAPI dependencies as ``Annotated`` aliases: the service context and the caller's identity."""

from __future__ import annotations

import dataclasses
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .config import Settings
from .jobs import JobStore, token_label
from .queue import Enqueuer
from .storage import Storage

__all__ = ["ServiceContext", "Ctx", "Actor", "get_context", "require_token"]

_bearer = HTTPBearer(auto_error=False, description="one of SPECTDOSE_API_TOKENS")


@dataclasses.dataclass
class ServiceContext:
    """What every route needs, built once per gateway process (``app.state.ctx``)."""

    settings: Settings
    store: JobStore
    storage: Storage
    enqueuer: Enqueuer


def get_context(request: Request) -> ServiceContext:
    return request.app.state.ctx


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's audit label; 401 without a valid ``Authorization: Bearer <token>``."""
    settings: Settings = request.app.state.ctx.settings
    if not settings.auth_enabled:
        return "anonymous"
    if credentials is not None and credentials.scheme.lower() == "bearer":
        offered = credentials.credentials.encode()
        for token in settings.api_tokens:
            if hmac.compare_digest(token.encode(), offered):
                return token_label(token)
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API token: send 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


Ctx = Annotated[ServiceContext, Depends(get_context)]
Actor = Annotated[str, Depends(require_token)]
