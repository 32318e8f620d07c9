"""Queries of privacy audits; state changes are conditional UPDATEs on an active (queued/running) audit."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.db import fetch_page
from backend.models import PrivacyAuditRun
from backend.privacy.schemas import ACTIVE_AUDIT_STATES, AuditStatus

_ACTIVE = [state.value for state in ACTIVE_AUDIT_STATES]


class PrivacyAuditRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, audit: PrivacyAuditRun) -> PrivacyAuditRun:
        self.session.add(audit)
        self.session.flush()
        return audit

    def get(self, job_id: int, audit_id: int) -> PrivacyAuditRun | None:
        return self.session.scalar(
            sa.select(PrivacyAuditRun)
            .where(PrivacyAuditRun.job_id == job_id, PrivacyAuditRun.id == audit_id)
            .execution_options(populate_existing=True)
        )

    def active_for_job(self, job_id: int) -> list[PrivacyAuditRun]:
        return list(
            self.session.scalars(
                sa.select(PrivacyAuditRun)
                .where(PrivacyAuditRun.job_id == job_id, PrivacyAuditRun.status.in_(_ACTIVE))
                .order_by(PrivacyAuditRun.id)
                .execution_options(populate_existing=True)
            ).all()
        )

    def active(self) -> list[PrivacyAuditRun]:
        """Every queued or running audit of every job."""
        return list(
            self.session.scalars(
                sa.select(PrivacyAuditRun)
                .where(PrivacyAuditRun.status.in_(_ACTIVE))
                .order_by(PrivacyAuditRun.id)
                .execution_options(populate_existing=True)
            ).all()
        )

    def page_for_job(self, job_id: int, *, limit: int, offset: int) -> tuple[list[PrivacyAuditRun], int]:
        query = (
            sa.select(PrivacyAuditRun)
            .where(PrivacyAuditRun.job_id == job_id)
            .order_by(PrivacyAuditRun.id.desc())
            .execution_options(populate_existing=True)
        )
        return fetch_page(self.session, query, limit=limit, offset=offset)

    def newest_completed(self, job_id: int, settings_key: str) -> PrivacyAuditRun | None:
        """The newest completed audit of `job_id` whose audited settings have this key."""
        return self.session.scalar(
            sa.select(PrivacyAuditRun)
            .where(
                PrivacyAuditRun.job_id == job_id,
                PrivacyAuditRun.status == AuditStatus.completed.value,
                PrivacyAuditRun.settings_key == settings_key,
            )
            .order_by(PrivacyAuditRun.id.desc())
            .limit(1)
        )

    def update_if_active(self, audit_id: int, **values: Any) -> bool:
        """`UPDATE ... WHERE id = .. AND status IN (queued, running)`: True when it changed the row, so an
        audit that ended stays as it ended whoever else updates it."""
        result = self.session.execute(
            sa.update(PrivacyAuditRun)
            .where(PrivacyAuditRun.id == audit_id, PrivacyAuditRun.status.in_(_ACTIVE))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]
