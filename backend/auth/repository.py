"""Queries of API tokens."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.db import fetch_page
from backend.models import ApiToken

ACTIVE_ADMIN = (ApiToken.role == "admin", ApiToken.revoked_at.is_(None))


class ApiTokenRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, token_id: int) -> ApiToken | None:
        return self.session.get(ApiToken, token_id)

    def get_by_hash(self, token_hash: str) -> ApiToken | None:
        return self.session.scalar(sa.select(ApiToken).where(ApiToken.token_hash == token_hash))

    def add(self, token: ApiToken) -> ApiToken:
        self.session.add(token)
        self.session.flush()
        return token

    def page(self, *, limit: int, offset: int) -> tuple[list[ApiToken], int]:
        return fetch_page(self.session, sa.select(ApiToken).order_by(ApiToken.id), limit=limit, offset=offset)

    def count_active_admins(self) -> int:
        return self.session.scalar(sa.select(sa.func.count()).where(*ACTIVE_ADMIN)) or 0

    def lock_active_admin_ids(self) -> list[int]:
        """Ids of the active admin tokens, row-locked until the transaction ends (PostgreSQL; SQLite ignores
        FOR UPDATE and serialises writers instead)."""
        query = sa.select(ApiToken.id).where(*ACTIVE_ADMIN).order_by(ApiToken.id).with_for_update()
        return list(self.session.scalars(query))

    def mark_revoked(self, token_id: int, now: datetime) -> bool:
        """Revoke an active token; False when it was already revoked (by a concurrent request, say)."""
        query = (
            sa.update(ApiToken)
            .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return self.session.execute(query).rowcount == 1  # type: ignore[attr-defined]

    def mark_used(self, token_id: int, now: datetime, stale_before: datetime) -> None:
        query = (
            sa.update(ApiToken)
            .where(
                ApiToken.id == token_id,
                sa.or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at < stale_before),
            )
            .values(last_used_at=now)
        )
        self.session.execute(query)
