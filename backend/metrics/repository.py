"""Queries of step metrics and artifacts."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.db import fetch_page
from backend.models import Artifact, StepMetric


class StepMetricRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, metric: StepMetric) -> StepMetric:
        self.session.add(metric)
        self.session.flush()
        return metric

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


class ArtifactRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, artifact: Artifact) -> Artifact:
        self.session.add(artifact)
        self.session.flush()
        return artifact

    def list_for_job(self, job_id: int) -> list[Artifact]:
        return list(
            self.session.scalars(sa.select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id))
        )
