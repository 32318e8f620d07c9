"""Queries of client agents and enrollment tokens."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.db import fetch_page
from backend.models import Client, EnrollmentToken
from flglm.protocol import ClientStatus


class ClientRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, client_id: int) -> Client | None:
        return self.session.get(Client, client_id)

    def get_by_name(self, name: str) -> Client | None:
        return self.session.scalar(sa.select(Client).where(Client.name == name))

    def get_by_names(self, names: Sequence[str]) -> list[Client]:
        return list(self.session.scalars(sa.select(Client).where(Client.name.in_(names))).all())

    def get_by_credential_hash(self, credential_hash: str) -> Client | None:
        return self.session.scalar(sa.select(Client).where(Client.credential_hash == credential_hash))

    def add(self, client: Client) -> Client:
        self.session.add(client)
        self.session.flush()
        return client

    def page(self, *, limit: int, offset: int, status: str | None = None) -> tuple[list[Client], int]:
        conditions = [] if status is None else [Client.status == status]
        query = sa.select(Client).where(*conditions).order_by(Client.id)
        return fetch_page(self.session, query, limit=limit, offset=offset)

    def mark_silent_offline(self, cutoff: datetime) -> list[int]:
        """Active clients whose last heartbeat (or, before their first, their enrollment) is older than
        `cutoff` become offline; returns their ids."""
        last_seen = sa.func.coalesce(Client.last_heartbeat_at, Client.enrolled_at)
        silent = list(
            self.session.scalars(
                sa.select(Client.id)
                .where(Client.status == ClientStatus.active, last_seen < cutoff)
                .with_for_update(skip_locked=True)
            ).all()
        )
        if silent:
            self.session.execute(
                sa.update(Client)
                .where(Client.id.in_(silent), Client.status == ClientStatus.active)
                .values(status=ClientStatus.offline)
                .execution_options(synchronize_session=False)
            )
        return silent


class EnrollmentTokenRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, token: EnrollmentToken) -> EnrollmentToken:
        self.session.add(token)
        self.session.flush()
        return token

    def claim(self, token_hash: str, now: datetime) -> int | None:
        """Atomically use an unexpired, unused token; returns its client id or None (one claimer wins)."""
        result = self.session.execute(
            sa.update(EnrollmentToken)
            .where(
                EnrollmentToken.token_hash == token_hash,
                EnrollmentToken.used_at.is_(None),
                EnrollmentToken.expires_at > now,
            )
            .values(used_at=now)
            .returning(EnrollmentToken.client_id)
            .execution_options(synchronize_session=False)
        )
        return result.scalar_one_or_none()
