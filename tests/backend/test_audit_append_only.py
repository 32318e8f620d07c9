"""The running app's audit log refuses UPDATE and DELETE in the database itself (both databases)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from tests.support.control_plane import Api


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET actor = 'mallory'",
        "DELETE FROM audit_events WHERE action = 'api_token.create'",
    ],
)
def test_the_apps_audit_rows_cannot_be_changed_or_deleted(api: Api, app: FastAPI, statement: str) -> None:
    created = api.ok("POST", "/tokens", 201, json={"name": "temp", "role": "viewer"})
    api.ok("DELETE", f"/tokens/{created['id']}")
    before = api.ok("GET", "/audit")
    assert [e["action"] for e in before["items"]][-2:] == ["api_token.create", "api_token.revoke"]
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), app.state.engine.begin() as conn:
        conn.execute(sa.text(statement))
    assert api.ok("GET", "/audit") == before
