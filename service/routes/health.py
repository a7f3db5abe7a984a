"""GET /health (liveness), /ready (database and broker reachable), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..deps import Ctx
from ..metrics import render_metrics
from ..schemas import HealthOut, ReadyOut

router = APIRouter(tags=["monitoring"])


@router.get("/health", response_model=HealthOut, summary="200 while the gateway is up (no authentication)")
def health(ctx: Ctx) -> HealthOut:
    from spectdose import __version__

    return HealthOut(status="ok", version=__version__, environment=ctx.settings.environment)


@router.get("/ready", response_model=ReadyOut, responses={503: {"model": ReadyOut}},
            summary="200 when the job store and the broker answer, else 503")
def ready(ctx: Ctx) -> JSONResponse:
    db, broker = "ok", "ok"
    try:
        with ctx.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the type is the message
        db = f"error: {type(exc).__name__}"
    try:
        ctx.enqueuer.ping()
    except Exception as exc:  # noqa: BLE001
        broker = f"error: {type(exc).__name__}"
    ok = db == "ok" and broker == "ok"
    body = ReadyOut(status="ready" if ok else "not ready", database=db, broker=broker)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    payload, content_type = render_metrics(request.app)
    return Response(payload, media_type=content_type)
