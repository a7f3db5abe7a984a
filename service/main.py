"""The FastAPI gateway: routers, the upload error mapping, metrics, and the sweeper thread.

Run with ``spectdose gateway`` (or ``uvicorn --factory service.main:create_app``).
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .config import Settings, load_settings
from .context import ServiceContext, build_context
from .deps import Actor
from .guards import RequestGuard
from .intake import UploadRejected
from .metrics import install_metrics
from .queue import Sweeper
from .routes import health_router, jobs_router, studies_router
from .routes.cycles import router as cycles_router
from .routes.regions import router as regions_router
from .routes.ui import router as ui_router
from .throttle import LoginThrottle

__all__ = ["create_app", "build_context", "purge_by_settings"]

log = logging.getLogger("spectdose.service")

_DESCRIPTION = """Lu-177 SPECT/CT voxel dosimetry as a service.

Submit a study with `POST /studies` (zip, multipart files or DICOMweb STOW-RS); follow the job
at `GET /jobs/{job_id}` (received -> queued -> running -> done | failed); fetch the RT Dose,
the dose-rate Parametric Map and the summary when it is done. Every endpoint except
`/health`, `/ready` and `/metrics` needs `Authorization: Bearer <token>`.
"""


def purge_by_settings(ctx: ServiceContext) -> dict[str, int]:
    """One retention pass with the SPECTDOSE_RETAIN_* settings."""
    st = ctx.settings
    return ctx.storage.purge(ctx.store, inputs_days=st.retain_inputs_days, jobs_days=st.retain_jobs_days,
                             max_jobs=st.retain_max_jobs, max_bytes=int(st.retain_max_gb * 2**30))


async def _upload_rejected(_request: Request, exc: UploadRejected) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _install_docs(app: FastAPI, mode: str) -> None:
    """/docs, /redoc and /openapi.json behind the API token (whenever there is one) or left out ("off")."""
    if mode != "token":
        return
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json(_actor: Actor) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(_actor: Actor):
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False)
    def redoc(_actor: Actor):
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - docs")


def create_app(settings: Settings | None = None, *, context: ServiceContext | None = None,
               sweeper: bool = True) -> FastAPI:
    """The gateway app. ``sweeper`` runs the repair loop (see :mod:`service.queue`) alongside."""
    from spectdose import __version__

    ctx = context or build_context(settings or load_settings())
    settings = ctx.settings

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        thread = None
        if sweeper:
            thread = Sweeper(ctx.store, ctx.enqueuer, interval_s=settings.sweep_interval_s, lease_s=settings.lease_s,
                             visibility_timeout_s=settings.visibility_timeout_s,
                             reconcile_interval_s=settings.reconcile_interval_s,
                             purge=lambda: purge_by_settings(ctx), purge_interval_s=settings.retention_interval_s)
            thread.start()
        if not settings.auth_enabled:
            log.warning("API authentication is OFF (%s)", "on a network address: anyone who reaches it reads "
                        "patient data" if settings.no_auth_beyond_loopback else "development mode, loopback only")
        yield
        if thread is not None:
            thread.stop()

    public_docs = settings.docs_mode == "public"
    app = FastAPI(title="spectdose gateway", version=__version__, description=_DESCRIPTION, lifespan=lifespan,
                  docs_url="/docs" if public_docs else None, redoc_url="/redoc" if public_docs else None,
                  openapi_url="/openapi.json" if public_docs else None)
    app.state.ctx = ctx
    app.state.login_throttle = LoginThrottle(settings.auth_max_failures, settings.auth_failure_window_s)
    _install_docs(app, settings.docs_mode)
    app.include_router(studies_router)
    app.include_router(jobs_router)
    app.include_router(regions_router)
    app.include_router(cycles_router)
    app.include_router(health_router)
    app.include_router(ui_router)
    app.add_exception_handler(UploadRejected, _upload_rejected)
    # Host/Origin, then the body's deadline; inside the metrics middleware, whose receive runs in a
    # task group (an UploadRejected raised there would arrive as an ExceptionGroup, a 500).
    app.add_middleware(RequestGuard, settings=settings)
    install_metrics(app, ctx)
    return app
