"""Engine and session factory: SQLite gets foreign keys ON, WAL and a busy timeout; Postgres is used as is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 10_000

Row = TypeVar("Row")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_db_engine(url: str, *, pooled: bool = True) -> Engine:
    """`pooled=False` gives one connection per use (migrations, short CLI commands)."""
    pool_args: dict[str, Any] = {} if pooled else {"poolclass": sa.pool.NullPool}
    if is_sqlite(url):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the database's mode.
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
            os.chmod(database, 0o600)
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **pool_args,
        )
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    if pooled:
        pool_args = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}
    return sa.create_engine(url, **pool_args)


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # The driver's default transaction handling begins a transaction only at the first write, so a
    # writer waits on the database lock (busy timeout) instead of failing on a stale WAL snapshot.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


def fetch_page(session: Session, query: sa.Select[Row], *, limit: int, offset: int) -> tuple[list[Row], int]:
    """One page of an ordered query and the total count of its rows (for `Page` responses)."""
    total = session.scalar(sa.select(sa.func.count()).select_from(query.order_by(None).subquery())) or 0
    return list(session.scalars(query.limit(limit).offset(offset)).all()), total


def fresh_postgres_schema(server_url: str, schema: str) -> str:
    """Drop and create `schema` in a PostgreSQL database; returns a URL whose search_path is that schema.

    A schema of its own keeps a test run or a benchmark apart from others that use the same database, and is
    much faster to recreate than a database.
    """
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    url = sa.engine.make_url(server_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def drop_postgres_schema(server_url: str, schema: str) -> None:
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()
