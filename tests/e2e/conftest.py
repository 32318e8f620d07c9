"""End-to-end tests run the embedded control plane (SQLite file, in-process executor unless a module's
`settings_overrides` pick Celery) on a live HTTPS uvicorn, and the admin talks to it over HTTPS."""

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
