"""Security headers on every response, no CDN script on the token's origin, private files private."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from apps.server import create_server_app
from backend.security_headers import CONTENT_SECURITY_POLICY
from backend.settings import Settings
from tests.support.control_plane import Api, LiveServer


def test_every_response_carries_the_security_headers(api: Api) -> None:
    for path in ("/api/v1/health", "/", "/api/v1/jobs", "/api/v1/nowhere", "/openapi.json"):
        response = api.http.get(path)  # answers, errors and static files alike
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "strict-transport-security" not in response.headers  # plain HTTP: HSTS would be ignored


def test_hsts_over_tls(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.base_url}/api/v1/health", verify=str(live_server.tls.ca_cert))
    assert response.headers["strict-transport-security"] == "max-age=31536000"


def test_swagger_ui_from_a_cdn_is_off_unless_asked_for(settings: Settings) -> None:
    with TestClient(create_server_app(settings)) as http:
        assert http.get("/docs").status_code == 404
        assert http.get("/openapi.json").status_code == 200
    with TestClient(create_server_app(settings.model_copy(update={"api_docs": True}))) as http:
        assert http.get("/docs").status_code == 200


def test_the_data_dir_and_the_sqlite_job_store_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    settings = Settings(
        data_dir=data_dir, bootstrap_admin_token="flglm_at_private", deadline_check_interval_s=0
    )
    with TestClient(create_server_app(settings)) as http:
        headers = {"Authorization": "Bearer flglm_at_private"}
        assert (
            http.post("/api/v1/tokens", json={"name": "v", "role": "viewer"}, headers=headers).status_code
            == 201
        )
        files = sorted(data_dir.glob("flglm.db*"))
        assert {f.name for f in files} >= {"flglm.db", "flglm.db-wal"}
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
