"""Migrations: empty → head → base on both databases, and the models never drift from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from backend.migrate import MIGRATIONS_DIR, downgrade, upgrade_to_head
from backend.models import Base
from tests.backend.conftest import fresh_postgres_schema


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    return fresh_postgres_schema(request.getfixturevalue("postgres_url"), "flglm_test_backend_migrations")


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _drift(url: str) -> list[object]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_roundtrip_and_no_drift(empty_db_url: str) -> None:
    model_tables = set(Base.metadata.tables)
    assert _tables(empty_db_url) == set()
    upgrade_to_head(empty_db_url)
    assert _tables(empty_db_url) == model_tables | {"alembic_version"}
    assert _drift(empty_db_url) == []  # autogenerate would find nothing to write
    downgrade(empty_db_url, "base")
    assert _tables(empty_db_url) == {"alembic_version"}
    upgrade_to_head(empty_db_url)  # and back up again: migrations are repeatable
    assert _tables(empty_db_url) == model_tables | {"alembic_version"}


def test_migration_files_have_dated_names() -> None:
    names = sorted(p.name for p in (MIGRATIONS_DIR / "versions").glob("*.py") if p.name != "__init__.py")
    assert names and all(name[:4].isdigit() and name[4] == "_" and name[10] == "_" for name in names)
