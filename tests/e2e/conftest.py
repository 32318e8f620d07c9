"""End-to-end fixtures: the whole control plane on a live HTTPS uvicorn (SQLite), agents over `StepClient`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from apps.server import create_server_app
from backend.settings import Settings
from tests.backend.conftest import ADMIN_TOKEN, Api, LiveServer, live_server

__all__ = ["live_server"]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Settings a test module changes (the Celery tests pick the executor and Redis); none by default."""
    return {}


@pytest.fixture
def settings(tmp_path: Path, settings_overrides: dict[str, Any]) -> Settings:
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


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_server_app(settings)


@pytest.fixture
def api(live_server: LiveServer) -> Iterator[Api]:
    """The admin's client of the live server, closed before the server stops (an idle TLS connection left
    open would hold uvicorn's shutdown until its close_notify times out)."""
    with live_server.client() as http:
        yield Api(http)
