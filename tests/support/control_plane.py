"""The control plane under test: API client, enrolled agents, job specs, databases, a live HTTPS server."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from apps.bench.stack import free_port as free_port  # one free-port finder for benches and tests
from apps.server import create_server_app
from backend.db import drop_postgres_schema, fresh_postgres_schema
from backend.migrate import upgrade_to_head
from backend.models import Base
from backend.settings import Settings
from backend.tls import TlsFiles, ensure_self_signed
from flglm.protocol import API_PREFIX
from flglm.wire.keys import generate_private_key, public_key_to_b64

ADMIN_TOKEN = "flglm_at_test-admin-token"
# One schema per test process: two runs on one machine (a CI clone beside a working copy) never share one.
PG_SCHEMA = f"flglm_test_backend_{os.getpid()}"


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database of each kind, shared by the session (tables are emptied before every test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'flglm.db'}"
    else:
        url = fresh_postgres_schema(request.getfixturevalue("postgres_url"), PG_SCHEMA)
    upgrade_to_head(url)
    yield url
    if request.param == "postgres":
        drop_postgres_schema(request.getfixturevalue("postgres_url"), PG_SCHEMA)


def empty_all_tables(url: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if url.startswith("postgresql"):
            conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            # The audit log's append-only triggers refuse DELETE (PostgreSQL's TRUNCATE skips row triggers):
            # lift them for the wipe and put the same ones back.
            triggers = conn.execute(
                sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
            ).all()
            for name, _ in triggers:
                conn.execute(sa.text(f'DROP TRIGGER "{name}"'))
            for table in tables:
                conn.execute(sa.text(f"DELETE FROM {table}"))
            for _, sql in triggers:
                conn.execute(sa.text(sql))
    engine.dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    """The backend contract tests' settings: each database of `db_url`, emptied; tests/e2e and
    tests/client_agent override it with `embedded_settings`."""
    empty_all_tables(db_url)
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        bootstrap_admin_token=ADMIN_TOKEN,
        deadline_check_interval_s=0,
        run_migrations_on_start=False,
        rate_limit_burst=10_000,
        rate_limit_per_minute=60_000,
        max_body_bytes=64 * 1024,
    )


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """What a test module changes in `embedded_settings` (the Celery tests pick the executor and Redis)."""
    return {}


@pytest.fixture
def embedded_settings(tmp_path: Path, settings_overrides: dict[str, Any]) -> Settings:
    """The embedded default (in-process executor, in-memory blobs) on a fresh SQLite file."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'flglm.db'}",
        bootstrap_admin_token=ADMIN_TOKEN,
        deadline_check_interval_s=0,
        rate_limit_burst=10_000,
        rate_limit_per_minute=60_000,
        max_body_bytes=1024 * 1024,
        **settings_overrides,
    )


@dataclass
class Api:
    """A test client speaking the API with a given bearer token (`as_(token)` switches identity)."""

    http: TestClient | httpx.Client
    token: str | None = ADMIN_TOKEN
    prefix: str = API_PREFIX

    def as_(self, token: str | None) -> Api:
        return Api(self.http, token, self.prefix)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        response: httpx.Response = self.http.request(method, self.prefix + path, headers=headers, **kwargs)  # type: ignore[assignment]
        return response

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def ok(self, method: str, path: str, expected: int = 200, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        assert response.status_code == expected, (method, path, response.status_code, response.text)
        return response.json()


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_server_app(settings)


@pytest.fixture
def api(app: FastAPI) -> Iterator[Api]:
    """The admin's client of the app in this process (no server)."""
    with TestClient(app) as client:
        yield Api(client)


@pytest.fixture
def live_api(live_server: LiveServer) -> Iterator[Api]:
    """The admin's client of the live server, closed before the server stops (an idle TLS connection left
    open would hold uvicorn's shutdown until its close_notify times out)."""
    with live_server.client() as http:
        yield Api(http)


@dataclass
class Agent:
    name: str
    client_id: int
    credential: str
    api: Api
    public_key: str = field(repr=False)


def enrollment_token(api: Api, name: str) -> str:
    body = api.ok("POST", "/clients/enrollment-tokens", 201, json={"name": name})
    token: str = body["token"]
    return token


def enroll(api: Api, name: str, token: str | None = None, example_count: int = 100) -> Agent:
    token = token or enrollment_token(api, name)
    public_key = public_key_to_b64(generate_private_key().public_key())
    body = api.as_(None).ok(
        "POST",
        "/agent/enroll",
        201,
        json={"token": token, "public_key": public_key, "example_count": example_count},
    )
    return Agent(name, body["client_id"], body["credential"], api.as_(body["credential"]), public_key)


def job_spec(clients: list[str], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "news-classifier",
        "model_ref": "smollm2-135m",
        "task_type": "classification",
        "split_plan": {"front_layers": 1, "back_layers": 1},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16},
        "hyperparameters": {"lr": 1e-4, "batch_size": 8},
        "parallel_mode": "client_batch",
        "rounds": 2,
        "steps_per_round": 5,
        "min_clients": len(clients) or 1,
        "round_timeout_s": 600,
        "clients": clients,
    }
    spec.update(overrides)
    return spec


def running_job(api: Api, agents: list[Agent], **overrides: Any) -> int:
    """Create, open, approve by every agent and start a job; returns its id."""
    job = api.ok("POST", "/jobs", 201, json=job_spec([a.name for a in agents], **overrides))
    api.ok("POST", f"/jobs/{job['id']}/open")
    for agent in agents:
        agent.api.ok("POST", f"/agent/invitations/{job['id']}/decision", json={"decision": "approve"})
    started = api.post(f"/jobs/{job['id']}/start")
    if started.status_code != 200:  # a housekeeping loop may have started it first (`start: auto`)
        assert api.ok("GET", f"/jobs/{job['id']}")["status"] == "running", started.text
    job_id: int = job["id"]
    return job_id


@dataclass
class LiveServer:
    base_url: str
    tls: TlsFiles
    app: FastAPI

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, verify=str(self.tls.ca_cert), timeout=30)


# Open connections (an agent's 60 s long-poll) are cut this long after a test ends.
GRACEFUL_SHUTDOWN_S = 2


@contextmanager
def uvicorn_in_thread(config: uvicorn.Config) -> Iterator[uvicorn.Server]:
    """Serve `config` in a thread of this process until the block ends, then stop it for good.

    The thread must be gone before the next test starts. A test's SQLite file was once found with a TLS
    1.3 close_notify record written over its header ("SQLit" + 17 03 03 00 13 ...; every request then a 500
    "file is not a database"): some TLS connection's descriptor number had been reused by that file. The
    suspect is a server from the test before, still closing its connections after the old 10 s join gave up.
    """
    config.timeout_graceful_shutdown = GRACEFUL_SHUTDOWN_S
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "uvicorn did not stop within 60 s of the test's end"


@pytest.fixture
def live_server(app: FastAPI, tmp_path: Path) -> Iterator[LiveServer]:
    """The app behind a real uvicorn with HTTPS (self-signed CA), in a thread of this process."""
    tls = ensure_self_signed(tmp_path / "tls")
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=str(tls.server_cert),
        ssl_keyfile=str(tls.server_key),
        log_level="warning",
        lifespan="on",
    )
    with uvicorn_in_thread(config):
        yield LiveServer(f"https://localhost:{port}", tls, app)
