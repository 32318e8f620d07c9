"""Migrations: empty → head → base on both databases, the models never drift, the audit log is append-only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from backend.db import drop_postgres_schema, fresh_postgres_schema
from backend.migrate import MIGRATIONS_DIR, downgrade, upgrade, upgrade_to_head
from backend.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    schema = f"flglm_test_backend_migrations_{os.getpid()}"  # apart from any other run on this machine
    yield fresh_postgres_schema(request.getfixturevalue("postgres_url"), schema)
    drop_postgres_schema(request.getfixturevalue("postgres_url"), schema)


@contextlib.contextmanager
def _engine(url: str) -> Iterator[sa.Engine]:
    """A connection-per-use engine, disposed after (so no connection outlives a migration step)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    with _engine(url) as engine:
        return set(sa.inspect(engine).get_table_names())


def _drift(url: str) -> list[object]:
    with _engine(url) as engine, engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


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


AUDIT_ROW = {
    "at": "2026-11-26 00:00:00",
    "actor": "system",
    "action": "test",
    "object_type": "t",
    "detail": "{}",
}
TAMPERING = {
    "UPDATE": "UPDATE audit_events SET actor = 'mallory'",
    "DELETE": "DELETE FROM audit_events",
}


def _execute(url: str, statement: str, params: dict[str, str] | None = None) -> None:
    with _engine(url) as engine, engine.begin() as conn:
        conn.execute(sa.text(statement), params or {})


def _audit_actors(url: str) -> list[str]:
    with _engine(url) as engine, engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT actor FROM audit_events ORDER BY id")))


def _insert_audit_row(url: str) -> None:
    columns = ", ".join(AUDIT_ROW)
    values = ", ".join(f":{name}" for name in AUDIT_ROW)
    _execute(url, f"INSERT INTO audit_events ({columns}) VALUES ({values})", AUDIT_ROW)


def _token_columns(url: str) -> set[str]:
    with _engine(url) as engine:
        return {column["name"] for column in sa.inspect(engine).get_columns("api_tokens")}


def test_audit_log_is_append_only_from_0002_and_it_downgrades_cleanly(empty_db_url: str) -> None:
    upgrade(empty_db_url, "0001")
    _insert_audit_row(empty_db_url)  # a row written before the triggers existed is protected too
    upgrade_to_head(empty_db_url)
    assert "last_used_at" in _token_columns(empty_db_url)
    for kind, statement in TAMPERING.items():
        with pytest.raises(sa.exc.DBAPIError, match=f"append-only: {kind} is not allowed"):
            _execute(empty_db_url, statement)
    _insert_audit_row(empty_db_url)  # appending still works
    assert _audit_actors(empty_db_url) == ["system", "system"]

    downgrade(empty_db_url, "0001")  # triggers (and PostgreSQL's function) and the column go
    assert "last_used_at" not in _token_columns(empty_db_url)
    _execute(empty_db_url, TAMPERING["UPDATE"])
    assert _audit_actors(empty_db_url) == ["mallory", "mallory"]
    _execute(empty_db_url, TAMPERING["DELETE"])
    assert _audit_actors(empty_db_url) == []

    upgrade_to_head(empty_db_url)  # and the guard comes back
    _insert_audit_row(empty_db_url)
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        _execute(empty_db_url, TAMPERING["DELETE"])
    assert _audit_actors(empty_db_url) == ["system"]


JOB_ROW = {
    "name": "j",
    "model_ref": "m",
    "task_type": "generation",
    "split_plan": "{}",
    "adapter": "{}",
    "hyperparameters": "{}",
    "privacy": "{}",
    "parallel_mode": "sequential",
    "replicas": 1,
    "rounds": 1,
    "steps_per_round": 1,
    "min_clients": 1,
    "round_timeout_s": 60.0,
    "straggler_policy": "drop",
    "status": "running",
    "current_round": 1,
    "created_by": "admin",
    "created_at": "2026-11-26 00:00:00",
    "updated_at": "2026-11-26 00:00:00",
}


def _job_columns_and_rows(url: str) -> tuple[set[str], int]:
    with _engine(url) as engine, engine.connect() as conn:
        columns = {column["name"] for column in sa.inspect(engine).get_columns("jobs")}
        rows = conn.execute(sa.text("SELECT count(*) FROM job_participants")).scalar_one()
        return columns, int(rows)


def test_0003_adds_the_job_key_columns_and_drops_them_keeping_every_row(empty_db_url: str) -> None:
    upgrade(empty_db_url, "0002")
    columns = ", ".join(JOB_ROW)
    _execute(
        empty_db_url, f"INSERT INTO jobs ({columns}) VALUES ({', '.join(f':{c}' for c in JOB_ROW)})", JOB_ROW
    )
    _execute(
        empty_db_url,
        "INSERT INTO clients (name, status, example_count, created_at) "
        "VALUES ('c', 'active', 0, '2026-11-26')",
    )
    _execute(
        empty_db_url,
        "INSERT INTO job_participants (job_id, client_id, consent, invited_at) "
        "SELECT j.id, c.id, 'approved', '2026-11-26' FROM jobs j, clients c",
    )
    upgrade_to_head(empty_db_url)
    columns_at_head, participants = _job_columns_and_rows(empty_db_url)
    assert {"server_public_key", "server_key_deleted_at"} <= columns_at_head and participants == 1
    downgrade(empty_db_url, "0002")  # no table rebuild: nothing cascades from the jobs table
    columns_before, participants = _job_columns_and_rows(empty_db_url)
    assert not {"server_public_key", "server_key_deleted_at"} & columns_before and participants == 1


def _insert_privacy_audit(url: str, status: str, task_key: str) -> None:
    _execute(
        url,
        "INSERT INTO privacy_audits (job_id, status, task_key, request, settings_key, created_by, "
        "created_at) SELECT id, :status, :task_key, '{}', 'k', 'admin', '2026-11-27 00:00:00' FROM jobs",
        {"status": status, "task_key": task_key},
    )


def test_0004_adds_privacy_audits_with_one_active_audit_per_job_and_drops_them(empty_db_url: str) -> None:
    upgrade(empty_db_url, "0003")
    assert "privacy_audits" not in _tables(empty_db_url)
    columns = ", ".join(JOB_ROW)
    _execute(
        empty_db_url, f"INSERT INTO jobs ({columns}) VALUES ({', '.join(f':{c}' for c in JOB_ROW)})", JOB_ROW
    )
    upgrade(empty_db_url, "0004")
    _insert_privacy_audit(empty_db_url, "completed", "a")
    _insert_privacy_audit(empty_db_url, "failed", "b")
    _insert_privacy_audit(empty_db_url, "queued", "c")
    for status in ("queued", "running"):  # a second active audit of the job is refused by the database
        with pytest.raises(sa.exc.IntegrityError):
            _insert_privacy_audit(empty_db_url, status, f"second-{status}")
    _execute(empty_db_url, "UPDATE privacy_audits SET status = 'completed' WHERE task_key = 'c'")
    _insert_privacy_audit(empty_db_url, "running", "d")  # once it ended, the next one may run
    with _engine(empty_db_url) as engine, engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM privacy_audits")).scalar_one() == 4

    downgrade(empty_db_url, "0003")  # the table goes; the jobs stay
    assert "privacy_audits" not in _tables(empty_db_url)
    with _engine(empty_db_url) as engine, engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 1
    upgrade_to_head(empty_db_url)
    assert "privacy_audits" in _tables(empty_db_url)
