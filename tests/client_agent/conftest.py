"""Client-agent fixtures: the embedded control plane (SQLite, in-process executor) on a live HTTPS uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from backend.app import create_app
from backend.settings import Settings
from tests.backend.conftest import ADMIN_TOKEN, Api, LiveServer, live_server

__all__ = ["live_server"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'flglm.db'}",
        bootstrap_admin_token=ADMIN_TOKEN,
        deadline_check_interval_s=0,
        rate_limit_burst=10_000,
        rate_limit_per_minute=60_000,
        max_body_bytes=1024 * 1024,
    )


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def api(live_server: LiveServer) -> Iterator[Api]:
    """The admin's client, closed before the server stops (an idle TLS connection would hold shutdown)."""
    with live_server.client() as http:
        yield Api(http)
