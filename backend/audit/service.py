"""Recording audit events; every state change of the control plane goes through `record`."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from backend.audit.repository import AuditRepository
from backend.models import AuditEvent, utc_now


def record(
    session: Session,
    actor: str,
    action: str,
    object_type: str,
    object_id: int | str | None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    event = AuditEvent(
        at=utc_now(),
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        detail=detail or {},
    )
    return AuditRepository(session).add(event)
