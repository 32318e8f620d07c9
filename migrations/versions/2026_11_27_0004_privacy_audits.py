"""Privacy audits of a job's settings: status, progress, the report or the error.

At most one queued or running audit per job: a partial unique index (PostgreSQL and SQLite both have them).
A new table only, so the downgrade drops it and touches nothing else.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.create_table(
        "privacy_audits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("task_key", sa.String(length=64), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("settings_key", sa.String(length=64), nullable=False),
        sa.Column("progress_stage", sa.String(length=200), nullable=True),
        sa.Column("progress_done", sa.Integer(), nullable=True),
        sa.Column("progress_total", sa.Integer(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_privacy_audits_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_audits")),
        sa.UniqueConstraint("task_key", name=op.f("uq_privacy_audits_task_key")),
    )
    op.create_index(op.f("ix_privacy_audits_job_id"), "privacy_audits", ["job_id"], unique=False)
    op.create_index(op.f("ix_privacy_audits_status"), "privacy_audits", ["status"], unique=False)
    op.create_index(
        "ix_privacy_audits_one_active_per_job",
        "privacy_audits",
        ["job_id"],
        unique=True,
        postgresql_where=ACTIVE,
        sqlite_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ix_privacy_audits_one_active_per_job", table_name="privacy_audits")
    op.drop_index(op.f("ix_privacy_audits_status"), table_name="privacy_audits")
    op.drop_index(op.f("ix_privacy_audits_job_id"), table_name="privacy_audits")
    op.drop_table("privacy_audits")
