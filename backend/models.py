"""Typed SQLAlchemy 2 models of the job store (the migrations in `migrations/` must match them exactly)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite stores them naive, so normalise both ways)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime(), dict[str, Any]: sa.JSON()}


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    role: Mapped[str] = mapped_column(sa.String(16))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    last_used_at: Mapped[datetime | None]  # to the minute (see `backend.auth.service.note_api_token_use`)
    revoked_at: Mapped[datetime | None]


class Client(Base):
    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    public_key: Mapped[str | None] = mapped_column(sa.String(64))
    credential_hash: Mapped[str | None] = mapped_column(sa.String(64), unique=True)
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    example_count: Mapped[int] = mapped_column(default=0)
    last_heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    enrolled_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    client_id: Mapped[int] = mapped_column(sa.ForeignKey("clients.id", ondelete="CASCADE"), index=True)
    created_by: Mapped[str] = mapped_column(sa.String(100))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    model_ref: Mapped[str] = mapped_column(sa.String(500))
    task_type: Mapped[str] = mapped_column(sa.String(32))
    split_plan: Mapped[dict[str, Any]]
    adapter: Mapped[dict[str, Any]]
    hyperparameters: Mapped[dict[str, Any]]
    privacy: Mapped[dict[str, Any]]
    parallel_mode: Mapped[str] = mapped_column(sa.String(32))
    replicas: Mapped[int]
    rounds: Mapped[int]
    steps_per_round: Mapped[int]
    min_clients: Mapped[int]
    round_timeout_s: Mapped[float]
    straggler_policy: Mapped[str] = mapped_column(sa.String(16))
    # `auto`: housekeeping starts the waiting job once min_clients approved clients are online; `manual`.
    start: Mapped[str] = mapped_column("start_mode", sa.String(16), server_default="auto")
    status: Mapped[str] = mapped_column(sa.String(32), index=True)
    current_round: Mapped[int] = mapped_column(default=0)
    failure_reason: Mapped[str | None] = mapped_column(sa.Text)
    # The job's own server X25519 public key (base64), set when the job opens; NULL for jobs from before
    # per-job keys, which use the deployment key. Its private half: `backend.server_keys.job_key_path`.
    server_public_key: Mapped[str | None] = mapped_column(sa.String(64))
    # When housekeeping deleted the private key file (its retention after the job ended ran out).
    server_key_deleted_at: Mapped[datetime | None]
    created_by: Mapped[str] = mapped_column(sa.String(100))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)


class JobParticipant(Base):
    """A client invited to a job, with its data owner's decision."""

    __tablename__ = "job_participants"
    __table_args__ = (sa.UniqueConstraint("job_id", "client_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[int] = mapped_column(sa.ForeignKey("clients.id", ondelete="CASCADE"), index=True)
    consent: Mapped[str] = mapped_column(sa.String(16))
    invited_at: Mapped[datetime] = mapped_column(default=utc_now)
    decided_at: Mapped[datetime | None]
    # The fatal error the client's agent reported for this job (it takes no part in later rounds).
    failure_reason: Mapped[str | None] = mapped_column(sa.Text)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (sa.UniqueConstraint("job_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    started_at: Mapped[datetime] = mapped_column(default=utc_now)
    deadline_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    close_reason: Mapped[str | None] = mapped_column(sa.String(200))


class RoundParticipant(Base):
    __tablename__ = "round_participants"
    __table_args__ = (sa.UniqueConstraint("round_id", "client_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(sa.ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[int] = mapped_column(sa.ForeignKey("clients.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(sa.String(16))
    example_count: Mapped[int | None]
    eval_metrics: Mapped[dict[str, Any] | None]
    finished_at: Mapped[datetime | None]
    drop_reason: Mapped[str | None] = mapped_column(sa.String(200))


class StepMetric(Base):
    __tablename__ = "step_metrics"
    __table_args__ = (sa.Index("ix_step_metrics_job_round_client", "job_id", "round_number", "client_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    client_id: Mapped[int] = mapped_column(sa.ForeignKey("clients.id", ondelete="CASCADE"), index=True)
    round_number: Mapped[int]
    step: Mapped[int]
    loss: Mapped[float | None]
    tokens: Mapped[int]
    phase_timings_s: Mapped[dict[str, Any]]
    wire_bytes_up: Mapped[int] = mapped_column(sa.BigInteger)
    wire_bytes_down: Mapped[int] = mapped_column(sa.BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class AuditEvent(Base):
    """Append-only: the code only inserts and reads these rows; database triggers refuse UPDATE and DELETE."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utc_now, index=True)
    actor: Mapped[str] = mapped_column(sa.String(100))
    action: Mapped[str] = mapped_column(sa.String(64))
    object_type: Mapped[str] = mapped_column(sa.String(32))
    object_id: Mapped[str | None] = mapped_column(sa.String(64))
    detail: Mapped[dict[str, Any]]


class PrivacyAuditRun(Base):
    """One privacy audit of a job's settings: queued, running (progress), completed (the report) or failed.

    Its task writes progress and outcome to the blob store under `task_key`
    (`flglm.contracts.privacy_records`); the control plane copies them here
    (`backend.privacy.service.sync_audit`). At most one queued or running audit per job: a partial unique
    index, so two racing starts cannot both insert one.
    """

    __tablename__ = "privacy_audits"
    __table_args__ = (
        sa.Index(
            "ix_privacy_audits_one_active_per_job",
            "job_id",
            unique=True,
            postgresql_where=sa.text("status IN ('queued', 'running')"),
            sqlite_where=sa.text("status IN ('queued', 'running')"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    task_key: Mapped[str] = mapped_column(sa.String(64), unique=True)
    request: Mapped[dict[str, Any]]  # the `AuditRequest` JSON: the job's settings as audited, and the text
    settings_key: Mapped[str] = mapped_column(sa.String(64))  # sha256 of the audited settings alone
    progress_stage: Mapped[str | None] = mapped_column(sa.String(200))
    progress_done: Mapped[int | None]
    progress_total: Mapped[int | None]
    result: Mapped[dict[str, Any] | None]  # the `PrivacyAudit` JSON once completed
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_by: Mapped[str] = mapped_column(sa.String(100))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
