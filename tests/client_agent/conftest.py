"""Client-agent tests run the same control plane as the end-to-end tests: the embedded default (SQLite file,
in-process executor) on a live HTTPS uvicorn, and the admin talks to it over HTTPS."""

from __future__ import annotations

import pytest

from backend.settings import Settings
from tests.support.control_plane import Api


@pytest.fixture
def settings(embedded_settings: Settings) -> Settings:
    return embedded_settings


@pytest.fixture
def api(live_api: Api) -> Api:
    return live_api
