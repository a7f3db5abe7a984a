"""One APIRouter per resource: studies (submission), jobs (state and outputs), health."""

from .health import router as health_router
from .jobs import router as jobs_router
from .studies import router as studies_router

__all__ = ["studies_router", "jobs_router", "health_router"]
