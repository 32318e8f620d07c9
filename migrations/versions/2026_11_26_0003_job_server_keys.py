"""A server X25519 key pair per job: the job's public key, and when its private key file was deleted.

`server_public_key` is NULL for jobs created before this revision: they keep using the deployment key.
The columns are dropped with a plain `ALTER TABLE ... DROP COLUMN` (SQLite 3.35+), never by SQLite's batch
mode: rebuilding `jobs` (copy, drop, rename) would cascade-delete every row that references a job.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("server_public_key", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("server_key_deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "server_key_deleted_at")
    op.drop_column("jobs", "server_public_key")
