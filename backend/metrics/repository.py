"""Queries of step metrics and artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.db import fetch_page
from backend.models import StepMetric


class StepMetricRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, metric: StepMetric) -> StepMetric:
        self.session.add(metric)
        self.session.flush()
        return metric

    def find(self, job_id: int, client_id: int, round_number: int, step: int) -> StepMetric | None:
        """The first metric a client reported for a step (agents resend one they are unsure arrived)."""
        query = (
            sa.select(StepMetric)
            .where(
                StepMetric.job_id == job_id,
                StepMetric.client_id == client_id,
                StepMetric.round_number == round_number,
                StepMetric.step == step,
            )
            .order_by(StepMetric.id)
            .limit(1)
        )
        return self.session.scalars(query).first()

    def page(
        self,
        *,
        limit: int,
        offset: int,
        job_id: int | None = None,
        round_number: int | None = None,
        client_id: int | None = None,
    ) -> tuple[list[StepMetric], int]:
        conditions: list[Any] = []
        if job_id is not None:
            conditions.append(StepMetric.job_id == job_id)
        if round_number is not None:
            conditions.append(StepMetric.round_number == round_number)
        if client_id is not None:
            conditions.append(StepMetric.client_id == client_id)
        query = sa.select(StepMetric).where(*conditions).order_by(StepMetric.id)
        return fetch_page(self.session, query, limit=limit, offset=offset)


class StepMetricTotals(NamedTuple):
    """Sums over every step metric one client reported for a job."""

    client_id: int
    steps_reported: int
    tokens: int
    wire_bytes_up: int
    wire_bytes_down: int


class StepMetricSummaryRepository:
    """Aggregates behind the job page: per-client totals, each client's latest step, the recent window."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def totals_per_client(self, job_id: int) -> list[StepMetricTotals]:
        rows = self.session.execute(
            sa.select(
                StepMetric.client_id,
                sa.func.count(StepMetric.id),
                sa.func.coalesce(sa.func.sum(StepMetric.tokens), 0),
                sa.func.coalesce(sa.func.sum(StepMetric.wire_bytes_up), 0),
                sa.func.coalesce(sa.func.sum(StepMetric.wire_bytes_down), 0),
            )
            .where(StepMetric.job_id == job_id)
            .group_by(StepMetric.client_id)
        ).all()
        return [StepMetricTotals(*(int(value) for value in row)) for row in rows]

    def latest_per_client(self, job_id: int) -> list[StepMetric]:
        newest = (
            sa.select(sa.func.max(StepMetric.id))
            .where(StepMetric.job_id == job_id)
            .group_by(StepMetric.client_id)
        )
        return list(self.session.scalars(sa.select(StepMetric).where(StepMetric.id.in_(newest))))

    def reported_since(self, job_id: int, since: datetime) -> list[StepMetric]:
        return list(
            self.session.scalars(
                sa.select(StepMetric)
                .where(StepMetric.job_id == job_id, StepMetric.created_at >= since)
                .order_by(StepMetric.id)
            )
        )
