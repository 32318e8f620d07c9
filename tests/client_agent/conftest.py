"""Client-agent fixtures: the embedded control plane on a live HTTPS uvicorn (from tests/e2e)."""

from tests.e2e.conftest import api, app, live_server, settings

__all__ = ["api", "app", "live_server", "settings"]
