"""The dashboard in Debian's Chromium on a live SQLite backend (the module-scoped `dashboard` fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from apps.server import create_server_app
from backend.app import FRONTEND_DIR
from backend.settings import Settings
from tests.support.control_plane import ADMIN_TOKEN, Agent, Api, enroll, free_port, uvicorn_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
TIMEOUT_MS = 10_000  # polling is 1.5 s, so every expectation below settles well within this


@dataclass
class Dashboard:
    base_url: str
    api: Api
    agents: list[Agent]
    spare: Agent
    viewer_token: str
    browser: Browser
    settings: Settings


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run scripts/setup.sh as root"
    assert (FRONTEND_DIR / "index.html").is_file()
    data_dir = tmp_path_factory.mktemp("dashboard")
    settings = Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'flglm.db'}",
        bootstrap_admin_token=ADMIN_TOKEN,
        deadline_check_interval_s=0,
        rate_limit_burst=10_000,
        rate_limit_per_minute=60_000,
    )
    port = free_port()
    config = uvicorn.Config(
        create_server_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    base_url = f"http://127.0.0.1:{port}"
    with (
        uvicorn_in_thread(config),
        httpx.Client(base_url=base_url, timeout=30) as http,
        sync_playwright() as playwright,
    ):
        api = Api(http)
        agents = [enroll(api, name, example_count=n) for name, n in (("hospital-a", 1200), ("clinic-b", 800))]
        spare = enroll(api, "old-laptop")
        viewer = api.ok("POST", "/tokens", 201, json={"name": "ops-viewer", "role": "viewer"})["token"]
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield Dashboard(base_url, api, agents, spare, viewer, browser, settings)
        finally:
            browser.close()


def signed_in_page(dashboard: Dashboard, token: str) -> tuple[BrowserContext, Page]:
    # A laptop-sized window: the page must stay readable at this width.
    context = dashboard.browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(dashboard.base_url + "/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    return context, page
