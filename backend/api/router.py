"""The `/api/v1` router: every domain's operator and agent routes, plus a health check."""

from __future__ import annotations

from fastapi import APIRouter

from backend.api.responses import ANY_ROUTE
from backend.audit.endpoints import router as audit_router
from backend.auth.endpoints import router as auth_router
from backend.auth.endpoints import tokens_router
from backend.clients import endpoints as clients
from backend.exports import endpoints as exports
from backend.jobs import endpoints as jobs
from backend.metrics import endpoints as metrics
from backend.privacy import endpoints as privacy
from backend.steps import endpoints as steps

# Every error has one body (`ErrorBody`, written by `backend.errors`): documented as such for what any route
# can answer (backend.api.responses), instead of FastAPI's own validation-error shape, which we never send.
api_router = APIRouter(responses=ANY_ROUTE)
for router in (
    auth_router,
    tokens_router,
    clients.router,
    clients.agent_router,
    jobs.router,
    jobs.agent_router,
    exports.router,
    exports.generation_router,
    metrics.router,
    metrics.agent_router,
    steps.router,
    privacy.router,
    audit_router,
):
    api_router.include_router(router)


@api_router.get("/health", tags=["health"])
def health() -> dict[str, str]:
    return {"status": "ok"}
