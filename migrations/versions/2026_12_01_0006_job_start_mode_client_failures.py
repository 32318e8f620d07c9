"""A job's start mode (`auto` starts it once min_clients approved clients are online, `manual` waits for the
operator) and the fatal error an agent reported for a job. Existing jobs start `auto`.

Plain `ADD/DROP COLUMN`, never SQLite batch mode (rebuilding `jobs` would cascade-delete what references it).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("start_mode", sa.String(length=16), server_default="auto", nullable=False)
    )
    op.add_column("job_participants", sa.Column("failure_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("job_participants", "failure_reason")
    op.drop_column("jobs", "start_mode")
