"""Queries of API tokens."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.models import ApiToken


class ApiTokenRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get_by_hash(self, token_hash: str) -> ApiToken | None:
        return self.session.scalar(sa.select(ApiToken).where(ApiToken.token_hash == token_hash))

    def add(self, token: ApiToken) -> ApiToken:
        self.session.add(token)
        self.session.flush()
        return token

    def count_active_admins(self) -> int:
        query = sa.select(sa.func.count()).where(ApiToken.role == "admin", ApiToken.revoked_at.is_(None))
        return self.session.scalar(query) or 0
