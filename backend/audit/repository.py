"""Queries of the audit log (insert and read only: the log is append-only)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.db import fetch_page
from backend.models import AuditEvent


class AuditRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, event: AuditEvent) -> AuditEvent:
        self.session.add(event)
        return event

    def page(
        self, *, limit: int, offset: int, object_type: str | None = None, object_id: str | None = None
    ) -> tuple[list[AuditEvent], int]:
        conditions: list[Any] = []
        if object_type is not None:
            conditions.append(AuditEvent.object_type == object_type)
        if object_id is not None:
            conditions.append(AuditEvent.object_id == object_id)
        query = sa.select(AuditEvent).where(*conditions).order_by(AuditEvent.id)
        return fetch_page(self.session, query, limit=limit, offset=offset)
