"""Client-agent fixtures: the embedded control plane (SQLite, in-process executor) on a live HTTPS uvicorn.

The same fixtures as the end-to-end tests (with no settings overrides), imported rather than copied.
"""

from tests.e2e.conftest import api, app, live_server, settings, settings_overrides

__all__ = ["api", "app", "live_server", "settings", "settings_overrides"]
