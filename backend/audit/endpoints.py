"""`GET /audit`: the audit log, for admins."""

from __future__ import annotations

from fastapi import APIRouter

from backend.api.deps import AdminDep, SessionDep
from backend.api.pagination import Page, PageDep
from backend.audit.repository import AuditRepository
from backend.audit.schemas import AuditEventView

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=Page[AuditEventView])
def list_audit_events(
    session: SessionDep,
    _: AdminDep,
    page: PageDep,
    object_type: str | None = None,
    object_id: str | None = None,
) -> Page[AuditEventView]:
    rows, total = AuditRepository(session).page(
        limit=page.limit, offset=page.offset, object_type=object_type, object_id=object_id
    )
    items = [AuditEventView.model_validate(row) for row in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)
