"""Queries of jobs, participants and rounds (conditional UPDATEs and row locks make racers see one winner)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend.db import fetch_page
from backend.jobs.after_commit import note_finished, note_work_changed
from backend.jobs.lifecycle import TERMINAL_STATES
from backend.models import Client, Job, JobParticipant, Round, RoundParticipant
from flglm.protocol import ConsentStatus, RoundStatus


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, job: Job) -> Job:
        self.session.add(job)
        self.session.flush()
        return job

    def get(self, job_id: int, *, for_update: bool = False) -> Job | None:
        query = sa.select(Job).where(Job.id == job_id)
        if for_update:
            # Postgres: the row stays locked until commit; SQLite ignores it (its writers are serialised).
            query = query.with_for_update()
        return self.session.scalar(query.execution_options(populate_existing=True))

    def page(self, *, limit: int, offset: int, status: str | None = None) -> tuple[list[Job], int]:
        conditions = [] if status is None else [Job.status == status]
        query = sa.select(Job).where(*conditions).order_by(Job.id.desc())
        return fetch_page(self.session, query, limit=limit, offset=offset)

    def with_status(self, statuses: list[str]) -> list[Job]:
        return list(self.session.scalars(sa.select(Job).where(Job.status.in_(statuses)).order_by(Job.id)))

    def ended_with_server_key(self, ended_before: datetime) -> list[int]:
        """Ids of terminal jobs last updated before `ended_before` whose server key file is not deleted."""
        query = (
            sa.select(Job.id)
            .where(
                Job.status.in_(list(TERMINAL_STATES)),
                Job.server_public_key.is_not(None),
                Job.server_key_deleted_at.is_(None),
                Job.updated_at < ended_before,
            )
            .order_by(Job.id)
        )
        return list(self.session.scalars(query).all())

    def set_status_if(self, job_id: int, expected: Collection[str], new: str, **values: Any) -> bool:
        """`UPDATE jobs SET status=new WHERE id=.. AND status IN expected`: True for the one winner, which
        notes a job that ends here for the after-commit work (see `backend.jobs.after_commit`)."""
        result = self.session.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.status.in_(list(expected)))
            .values(status=new, **values)
            .execution_options(synchronize_session=False)
        )
        won = bool(result.rowcount == 1)  # type: ignore[attr-defined]
        if won:
            note_work_changed(self.session, job_id)
        if won and new in TERMINAL_STATES:
            note_finished(self.session, job_id)
        return won


class ParticipantRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, participant: JobParticipant) -> JobParticipant:
        self.session.add(participant)
        return participant

    def get(self, job_id: int, client_id: int) -> JobParticipant | None:
        return self.session.scalar(
            sa.select(JobParticipant).where(
                JobParticipant.job_id == job_id, JobParticipant.client_id == client_id
            )
        )

    def list_for_job(self, job_id: int) -> list[tuple[JobParticipant, Client]]:
        rows = self.session.execute(
            sa.select(JobParticipant, Client)
            .join(Client, Client.id == JobParticipant.client_id)
            .where(JobParticipant.job_id == job_id)
            .order_by(JobParticipant.id)
        ).all()
        return [(row[0], row[1]) for row in rows]

    def list_for_client(
        self, client_id: int, *, job_statuses: Collection[str] | None = None, consent: str | None = None
    ) -> list[tuple[JobParticipant, Job]]:
        query = (
            sa.select(JobParticipant, Job)
            .join(Job, Job.id == JobParticipant.job_id)
            .where(JobParticipant.client_id == client_id)
        )
        if job_statuses is not None:
            query = query.where(Job.status.in_(list(job_statuses)))
        if consent is not None:
            query = query.where(JobParticipant.consent == consent)
        rows = self.session.execute(query.order_by(Job.id)).all()
        return [(row[0], row[1]) for row in rows]

    def unended_job_ids(self, client_id: int) -> list[int]:
        """The jobs this client is invited to or takes part in that have not ended."""
        query = (
            sa.select(JobParticipant.job_id)
            .join(Job, Job.id == JobParticipant.job_id)
            .where(JobParticipant.client_id == client_id, Job.status.not_in(list(TERMINAL_STATES)))
        )
        return list(self.session.scalars(query).all())

    def approved_active_client_ids(self, job_id: int) -> list[int]:
        """Clients that approved the job and are currently online (not pending, offline or revoked), less
        those whose agent reported a fatal error for it."""
        return list(
            self.session.scalars(
                sa.select(JobParticipant.client_id)
                .join(Client, Client.id == JobParticipant.client_id)
                .where(
                    JobParticipant.job_id == job_id,
                    JobParticipant.consent == ConsentStatus.approved,
                    JobParticipant.failure_reason.is_(None),
                    Client.status == "active",
                )
                .order_by(JobParticipant.client_id)
            ).all()
        )


class RoundRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, round_: Round, client_ids: Collection[int]) -> Round:
        self.session.add(round_)
        self.session.flush()
        note_work_changed(self.session, round_.job_id)
        for client_id in client_ids:
            self.session.add(RoundParticipant(round_id=round_.id, client_id=client_id, status="active"))
        self.session.flush()
        return round_

    def get(self, job_id: int, number: int, *, for_update: bool = False) -> Round | None:
        query = sa.select(Round).where(Round.job_id == job_id, Round.number == number)
        if for_update:
            query = query.with_for_update()
        return self.session.scalar(query.execution_options(populate_existing=True))

    def list_for_job(self, job_id: int) -> list[Round]:
        return list(
            self.session.scalars(sa.select(Round).where(Round.job_id == job_id).order_by(Round.number))
        )

    def open_round(self, job_id: int) -> Round | None:
        return self.session.scalar(
            sa.select(Round).where(Round.job_id == job_id, Round.status == RoundStatus.open)
        )

    def set_status_if_open(self, round_id: int, new: str, **values: Any) -> bool:
        result = self.session.execute(
            sa.update(Round)
            .where(Round.id == round_id, Round.status == RoundStatus.open)
            .values(status=new, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def overdue_open_round_ids(self, now: Any) -> list[tuple[int, int]]:
        """(job_id, round number) of open rounds of running jobs whose deadline has passed."""
        rows = self.session.execute(
            sa.select(Round.job_id, Round.number)
            .join(Job, Job.id == Round.job_id)
            .where(Round.status == RoundStatus.open, Round.deadline_at < now, Job.status == "running")
        ).all()
        return [(row[0], row[1]) for row in rows]

    def open_rounds_with_client(self, client_id: int) -> list[tuple[int, int]]:
        rows = self.session.execute(
            sa.select(Round.job_id, Round.number)
            .join(RoundParticipant, RoundParticipant.round_id == Round.id)
            .where(
                Round.status == RoundStatus.open,
                RoundParticipant.client_id == client_id,
                RoundParticipant.status == "active",
            )
        ).all()
        return [(row[0], row[1]) for row in rows]

    def participants(self, round_id: int) -> list[RoundParticipant]:
        return list(
            self.session.scalars(
                sa.select(RoundParticipant)
                .where(RoundParticipant.round_id == round_id)
                .order_by(RoundParticipant.client_id)
                .execution_options(populate_existing=True)
            )
        )

    def participant(self, round_id: int, client_id: int) -> RoundParticipant | None:
        return self.session.scalar(
            sa.select(RoundParticipant)
            .where(RoundParticipant.round_id == round_id, RoundParticipant.client_id == client_id)
            .execution_options(populate_existing=True)
        )
