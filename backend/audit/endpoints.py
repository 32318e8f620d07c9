"""`GET /audit`: the audit log, for admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from backend.api.deps import AdminDep, SessionDep
from backend.api.pagination import Page, PageDep
from backend.api.responses import ROLE_GATED
from backend.audit.repository import AuditRepository
from backend.audit.schemas import AuditEventView

# Bounded where they enter: as long as the columns, and printable ASCII (PostgreSQL refuses a NUL in text: a
# NUL here was a 500).
ObjectType = Annotated[str | None, Query(max_length=32, pattern=r"^[a-z_.]+$")]
ObjectId = Annotated[str | None, Query(max_length=64, pattern=r"^[\x21-\x7e]+$")]

router = APIRouter(prefix="/audit", tags=["audit"], responses=ROLE_GATED)


@router.get("", response_model=Page[AuditEventView])
def list_audit_events(
    session: SessionDep,
    _: AdminDep,
    page: PageDep,
    object_type: ObjectType = None,
    object_id: ObjectId = None,
) -> Page[AuditEventView]:
    rows, total = AuditRepository(session).page(
        limit=page.limit, offset=page.offset, object_type=object_type, object_id=object_id
    )
    items = [AuditEventView.model_validate(row) for row in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)
