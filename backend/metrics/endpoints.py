"""Metric routes: agents post per-step metrics; operators list them and read a job's live progress."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status

from backend.api.deps import ClientDep, OperatorDep, SessionDep, SettingsDep
from backend.api.pagination import Page, PageDep
from backend.api.responses import ROLE_GATED, errors
from backend.metrics.repository import StepMetricRepository
from backend.metrics.schemas import JobProgressView, StepMetricIn, StepMetricView
from backend.metrics.service import job_progress, record_step_metric
from backend.models import utc_now
from backend.steps.service import JobNotServed, read_spec
from flglm import protocol
from flglm.protocol import MAX_DB_INT

router = APIRouter(prefix="/metrics", tags=["metrics"], responses=ROLE_GATED)
agent_router = APIRouter(tags=["agent"], responses=ROLE_GATED)


@router.get("", response_model=Page[StepMetricView])
def list_metrics(
    session: SessionDep,
    _: OperatorDep,
    page: PageDep,
    job_id: Annotated[int | None, Query(ge=1, le=MAX_DB_INT)] = None,
    round_number: Annotated[int | None, Query(ge=1, le=MAX_DB_INT)] = None,
    client_id: Annotated[int | None, Query(ge=1, le=MAX_DB_INT)] = None,
) -> Page[StepMetricView]:
    rows, total = StepMetricRepository(session).page(
        limit=page.limit, offset=page.offset, job_id=job_id, round_number=round_number, client_id=client_id
    )
    items = [StepMetricView.model_validate(row, from_attributes=True) for row in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/jobs/{job_id}/progress", response_model=JobProgressView, responses=errors(404))
def show_job_progress(
    job_id: Annotated[int, Path(ge=1, le=MAX_DB_INT)],
    request: Request,
    session: SessionDep,
    _: OperatorDep,
    settings: SettingsDep,
) -> JobProgressView:
    """Per-client step, heartbeat and traffic, replica load and throughput: the dashboard's live view."""
    replicas = _served_replicas(request, job_id)
    return job_progress(session, job_id, utc_now(), settings.heartbeat_lease_s, replicas)


def _served_replicas(request: Request, job_id: int) -> dict[int, int] | None:
    """Client id -> replica from the worker spec published at job start; None before the job started."""
    try:
        spec = read_spec(request.app.state.step_relay, job_id)
    except JobNotServed:
        return None
    return {client_id: spec.replica_of(client_id) for client_id in spec.client_ids()}


@agent_router.post(
    protocol.STEP_METRICS_PATH,
    response_model=StepMetricView,
    status_code=status.HTTP_201_CREATED,
    responses=errors(404, 409),
)
def post_step_metric(
    job_id: Annotated[int, Path(ge=1, le=MAX_DB_INT)],
    body: StepMetricIn,
    session: SessionDep,
    client: ClientDep,
) -> StepMetricView:
    metric = record_step_metric(session, client.id, job_id, body, utc_now())
    return StepMetricView.model_validate(metric, from_attributes=True)
