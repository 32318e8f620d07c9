"""Privacy-audit routes: admins start an audit of a job's settings; admins and viewers follow them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Request, status

from backend.api.deps import AdminDep, OperatorDep, SessionDep, SettingsDep
from backend.api.pagination import Page, PageDep
from backend.api.responses import ROLE_GATED, errors
from backend.models import utc_now
from backend.privacy import service
from backend.privacy.schemas import AuditStartRequest, PrivacyAuditView
from backend.steps.relay import StepRelay
from flglm.protocol import MAX_DB_INT

router = APIRouter(prefix="/jobs", tags=["privacy"], responses=ROLE_GATED)

JobId = Annotated[int, Path(ge=1, le=MAX_DB_INT)]
AuditId = Annotated[int, Path(ge=1, le=MAX_DB_INT)]


def _runtime(request: Request) -> StepRelay:
    relay: StepRelay = request.app.state.step_relay
    return relay


@router.post(
    "/{job_id}/privacy-audits",
    response_model=PrivacyAuditView,
    status_code=status.HTTP_202_ACCEPTED,
    responses=errors(404, 409, 503),
)
def start_audit(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    settings: SettingsDep,
    body: Annotated[AuditStartRequest | None, Body()] = None,
) -> PrivacyAuditView:
    """Queue an audit of the job's current settings (what a curious server recovers of the training text)."""
    relay = _runtime(request)
    audit = service.start_audit(
        session,
        admin.actor,
        job_id,
        body or AuditStartRequest(),
        utc_now(),
        relay.dispatcher,
        relay.store,
        settings.privacy_audit_queue_timeout_s,
    )
    return service.audit_view(audit, audit.settings_key)  # it audits the job's current settings


@router.get("/{job_id}/privacy-audits", response_model=Page[PrivacyAuditView], responses=errors(404))
def list_audits(
    job_id: JobId, request: Request, session: SessionDep, _: OperatorDep, settings: SettingsDep, page: PageDep
) -> Page[PrivacyAuditView]:
    """The job's audits, newest first: status, progress while running, the report or the error."""
    items, total = service.list_audits(
        session,
        job_id,
        _runtime(request).store,
        utc_now(),
        settings.privacy_audit_queue_timeout_s,
        limit=page.limit,
        offset=page.offset,
    )
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/{job_id}/privacy-audits/{audit_id}", response_model=PrivacyAuditView, responses=errors(404))
def show_audit(
    job_id: JobId,
    audit_id: AuditId,
    request: Request,
    session: SessionDep,
    _: OperatorDep,
    settings: SettingsDep,
) -> PrivacyAuditView:
    return service.show_audit(
        session, job_id, audit_id, _runtime(request).store, utc_now(), settings.privacy_audit_queue_timeout_s
    )
