"""API tokens' last use; the audit log becomes append-only in the database (triggers refuse UPDATE, DELETE).

PostgreSQL: one row trigger calling a plpgsql function that raises. SQLite (embedded mode): one `RAISE(ABORT)`
trigger per statement kind. TRUNCATE (PostgreSQL only, a table-owner privilege the app never uses) is not
guarded: the tests empty their tables with it. A later migration that rebuilds `audit_events` with SQLite's
batch mode (copy and rename) drops its triggers and must create them again.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 05:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSTGRES_UPGRADE = [
    """
    CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP;
    END
    $$
    """,
    """
    CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()
    """,
]
POSTGRES_DOWNGRADE = [
    "DROP TRIGGER audit_events_append_only ON audit_events",
    "DROP FUNCTION audit_events_append_only()",
]
SQLITE_UPGRADE = [
    f"""
    CREATE TRIGGER audit_events_no_{kind.lower()} BEFORE {kind} ON audit_events
    BEGIN
        SELECT RAISE(ABORT, 'audit_events is append-only: {kind} is not allowed');
    END
    """
    for kind in ("UPDATE", "DELETE")
]
SQLITE_DOWNGRADE = ["DROP TRIGGER audit_events_no_update", "DROP TRIGGER audit_events_no_delete"]


def _run(postgres: list[str], sqlite: list[str]) -> None:
    dialect = op.get_bind().dialect.name
    statements = {"postgresql": postgres, "sqlite": sqlite}.get(dialect)
    if statements is None:
        raise NotImplementedError(f"no append-only trigger for the {dialect} database")
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    _run(POSTGRES_UPGRADE, SQLITE_UPGRADE)


def downgrade() -> None:
    _run(POSTGRES_DOWNGRADE, SQLITE_DOWNGRADE)
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_column("last_used_at")
