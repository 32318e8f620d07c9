"""Operators' API tokens: list (never a secret), create → use → revoke → 401, last-admin guard, audit."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi import FastAPI

from backend.auth.service import LastAdminToken, hash_secret, revoke_api_token
from backend.models import utc_now
from tests.support.control_plane import ADMIN_TOKEN, Api

VIEW_FIELDS = {"id", "name", "role", "created_at", "last_used_at", "revoked_at"}


def _tokens(api: Api) -> dict[str, dict[str, Any]]:
    items: list[dict[str, Any]] = api.ok("GET", "/tokens")["items"]
    return {item["name"]: item for item in items}


def _admin_id(api: Api) -> int:
    admin_id: int = api.ok("GET", "/auth/me")["id"]
    return admin_id


def test_listing_shows_every_token_but_never_a_secret_or_its_hash(api: Api) -> None:
    created = [
        api.ok("POST", "/tokens", 201, json={"name": "ops-viewer", "role": "viewer"}),
        api.ok("POST", "/tokens", 201, json={"name": "second-admin", "role": "admin"}),
    ]
    assert all(body["token"].startswith("flglm_at_") and body["last_used_at"] is None for body in created)
    response = api.get("/tokens")
    assert response.status_code == 200
    listing = response.json()
    assert listing["total"] == 3 and [item["name"] for item in listing["items"]] == [
        "bootstrap-admin",
        "ops-viewer",
        "second-admin",
    ]
    assert all(set(item) == VIEW_FIELDS for item in listing["items"])
    for secret in [ADMIN_TOKEN, *(body["token"] for body in created)]:
        assert secret not in response.text and hash_secret(secret) not in response.text
    assert api.get("/tokens", params={"limit": 1, "offset": 2}).json()["items"][0]["name"] == "second-admin"


def test_create_use_revoke_then_401(api: Api) -> None:
    created = api.ok("POST", "/tokens", 201, json={"name": "ci-bot", "role": "viewer"})
    bot = api.as_(created["token"])
    assert bot.ok("GET", "/auth/me") == {
        "kind": "token",
        "id": created["id"],
        "name": "ci-bot",
        "role": "viewer",
    }
    assert bot.ok("GET", "/jobs")["total"] == 0
    listed = _tokens(api)["ci-bot"]
    assert listed["last_used_at"] is not None and listed["revoked_at"] is None
    bot.ok("GET", "/clients")
    assert _tokens(api)["ci-bot"]["last_used_at"] == listed["last_used_at"]  # written once a minute at most

    revoked = api.ok("DELETE", f"/tokens/{created['id']}")
    assert revoked["revoked_at"] is not None and set(revoked) == VIEW_FIELDS
    for method, path in (("GET", "/auth/me"), ("GET", "/jobs"), ("GET", "/metrics")):
        denied = bot.request(method, path)
        assert denied.status_code == 401, (path, denied.text)
        assert denied.json()["error"]["code"] == "invalid_credential"
    assert _tokens(api)["ci-bot"]["revoked_at"] == revoked["revoked_at"]
    # Revoking twice changes nothing; an unknown id is a 404 naming it.
    assert api.ok("DELETE", f"/tokens/{created['id']}") == revoked
    missing = api.request("DELETE", "/tokens/9999")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "api_token_not_found"
    assert "9999" in missing.json()["error"]["message"]


def test_viewers_cannot_list_create_or_revoke_tokens(api: Api) -> None:
    viewer = api.ok("POST", "/tokens", 201, json={"name": "watcher", "role": "viewer"})
    as_viewer = api.as_(viewer["token"])
    calls = [
        as_viewer.get("/tokens"),
        as_viewer.post("/tokens", json={"name": "escalate", "role": "admin"}),
        as_viewer.request("DELETE", f"/tokens/{_admin_id(api)}"),
        as_viewer.request("DELETE", f"/tokens/{viewer['id']}"),
    ]
    assert [r.status_code for r in calls] == [403, 403, 403, 403]
    assert all(r.json()["error"]["code"] == "insufficient_role" for r in calls)
    assert set(_tokens(api)) == {"bootstrap-admin", "watcher"}
    assert _tokens(api)["bootstrap-admin"]["revoked_at"] is None


def test_the_last_active_admin_token_cannot_be_revoked(api: Api) -> None:
    bootstrap_id = _admin_id(api)
    viewer = api.ok("POST", "/tokens", 201, json={"name": "v", "role": "viewer"})
    refused = api.request("DELETE", f"/tokens/{bootstrap_id}")
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "last_admin_token" and "last active admin token" in error["message"]
    assert api.ok("GET", "/auth/me")["id"] == bootstrap_id  # nothing was written
    assert api.ok("DELETE", f"/tokens/{viewer['id']}")["revoked_at"] is not None  # viewers: no guard

    second = api.ok("POST", "/tokens", 201, json={"name": "second-admin", "role": "admin"})
    as_second = api.as_(second["token"])
    assert as_second.ok("DELETE", f"/tokens/{bootstrap_id}")["revoked_at"] is not None
    assert api.get("/tokens").status_code == 401
    assert as_second.request("DELETE", f"/tokens/{second['id']}").status_code == 409
    assert as_second.ok("GET", "/auth/me")["name"] == "second-admin"


def test_creating_and_revoking_tokens_is_audited(api: Api) -> None:
    created = api.ok("POST", "/tokens", 201, json={"name": "audited", "role": "viewer"})
    api.ok("DELETE", f"/tokens/{created['id']}")
    api.ok("DELETE", f"/tokens/{created['id']}")  # a no-op: not audited twice
    events = api.ok("GET", "/audit", params={"object_type": "api_token", "object_id": str(created["id"])})
    actor = f"token:{_admin_id(api)}:bootstrap-admin"
    assert [(e["action"], e["actor"], e["detail"]) for e in events["items"]] == [
        ("api_token.create", actor, {"name": "audited", "role": "viewer"}),
        ("api_token.revoke", actor, {"name": "audited", "role": "viewer"}),
    ]
    assert created["token"] not in str(events)


def test_concurrent_revokes_of_the_last_two_admin_tokens_leave_one(app: FastAPI, api: Api) -> None:
    """The first revoke holds its transaction open while the second runs: the second sees it and refuses."""
    second = api.ok("POST", "/tokens", 201, json={"name": "second-admin", "role": "admin"})
    bootstrap_id = _admin_id(api)
    outcome: list[object] = []

    def revoke_second() -> None:
        with app.state.session_factory() as session:
            try:
                revoke_api_token(session, "test", second["id"], utc_now())
                session.commit()
                outcome.append("revoked")
            except LastAdminToken as exc:
                session.rollback()
                outcome.append(exc)

    with app.state.session_factory() as first:
        revoke_api_token(first, "test", bootstrap_id, utc_now())
        racer = threading.Thread(target=revoke_second)
        racer.start()
        racer.join(timeout=1)
        assert racer.is_alive()  # waiting for the first transaction (row locks / SQLite's write lock)
        first.commit()
    racer.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], LastAdminToken)
    assert api.as_(second["token"]).ok("GET", "/auth/me")["name"] == "second-admin"
    with pytest.raises(AssertionError, match="401"):
        api.ok("GET", "/auth/me")
