"""Roles × endpoints: a missing, forged or revoked credential → 401, a wrong role → 403; clients isolated."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.support.control_plane import Agent, Api, enroll, job_spec, running_job

# (method, path template, who may call it). Templates use {job}, {client}, {session}; bodies are valid for the
# caller.
OPERATOR_READ = {"admin", "viewer"}
ADMIN = {"admin"}
CLIENT = {"client"}
ANY = {"admin", "viewer", "client"}

ENDPOINTS: list[tuple[str, str, set[str]]] = [
    ("GET", "/auth/me", ANY),
    ("GET", "/tokens", ADMIN),
    ("POST", "/tokens", ADMIN),
    ("DELETE", "/tokens/{token}", ADMIN),
    ("POST", "/clients/enrollment-tokens", ADMIN),
    ("GET", "/clients", OPERATOR_READ),
    ("GET", "/clients/{client}", OPERATOR_READ),
    ("POST", "/clients/{client}/revoke", ADMIN),
    ("POST", "/jobs", ADMIN),
    ("GET", "/jobs", OPERATOR_READ),
    ("GET", "/jobs/{job}", OPERATOR_READ),
    ("POST", "/jobs/{job}/open", ADMIN),
    ("POST", "/jobs/{job}/start", ADMIN),
    ("POST", "/jobs/{job}/pause", ADMIN),
    ("POST", "/jobs/{job}/resume", ADMIN),
    ("POST", "/jobs/{job}/cancel", ADMIN),
    ("GET", "/jobs/{job}/participants", OPERATOR_READ),
    ("POST", "/jobs/{job}/participants", ADMIN),
    ("GET", "/jobs/{job}/rounds", OPERATOR_READ),
    ("POST", "/jobs/{job}/rounds/1/close", ADMIN),
    ("POST", "/jobs/{job}/privacy-audits", ADMIN),
    ("GET", "/jobs/{job}/privacy-audits", OPERATOR_READ),
    ("GET", "/jobs/{job}/privacy-audits/1", OPERATOR_READ),
    ("GET", "/jobs/{job}/export", ADMIN),
    ("POST", "/jobs/{job}/generate", ADMIN),
    ("POST", "/jobs/{job}/generate/sessions", ADMIN),
    ("POST", "/jobs/{job}/generate/sessions/{session}/body", ADMIN),
    ("DELETE", "/jobs/{job}/generate/sessions/{session}", ADMIN),
    ("GET", "/metrics", OPERATOR_READ),
    ("GET", "/metrics/jobs/{job}/progress", OPERATOR_READ),
    ("GET", "/audit", ADMIN),
    ("POST", "/agent/heartbeat", CLIENT),
    ("GET", "/agent/invitations", CLIENT),
    ("POST", "/agent/invitations/{job}/decision", CLIENT),
    ("GET", "/agent/jobs/{job}", CLIENT),
    ("GET", "/agent/work", CLIENT),
    ("POST", "/agent/jobs/{job}/rounds/1/done", CLIENT),
    ("POST", "/agent/jobs/{job}/metrics", CLIENT),
    ("POST", "/agent/jobs/{job}/failure", CLIENT),
    ("PUT", "/agent/jobs/{job}/rounds/1/steps/0/activations/1", CLIENT),
    ("GET", "/agent/jobs/{job}/rounds/1/steps/0/activations/1/result", CLIENT),
    ("PUT", "/agent/jobs/{job}/rounds/1/client-adapters", CLIENT),
    ("GET", "/agent/jobs/{job}/rounds/1/client-adapters", CLIENT),
]

BODIES: dict[str, object] = {
    "/tokens": {"name": "x", "role": "viewer"},
    "/clients/enrollment-tokens": {"name": "matrix-new"},
    "/jobs": job_spec([]),
    "/jobs/{job}/participants": {"clients": ["matrix-client"]},
    "/jobs/{job}/generate": {"prompts": ["hi"], "max_new_tokens": 1},
    "/agent/heartbeat": {},
    "/agent/invitations/{job}/decision": {"decision": "approve"},
    "/agent/jobs/{job}/rounds/1/done": {"example_count": 1},
    "/agent/jobs/{job}/metrics": {"round_number": 1, "step": 0},
    "/agent/jobs/{job}/failure": {"reason": "matrix"},
}


def _call(api: Api, method: str, template: str, job_id: int, client_id: int, token_id: int) -> int:
    path = template.format(job=job_id, client=client_id, session="0" * 32, token=token_id)
    body = BODIES.get(template)
    return api.request(method, path, json=body if method == "POST" else None).status_code


def test_every_endpoint_of_the_api_is_in_the_matrix(api: Api) -> None:
    schema = api.http.get("/openapi.json").json()
    served = {
        (method.upper(), path.removeprefix("/api/v1"))
        for path, operations in schema["paths"].items()
        for method in operations
    }
    public = {("POST", "/agent/enroll"), ("GET", "/health")}
    listed = {
        (
            m,
            t.replace("{job}", "{job_id}")
            .replace("{client}", "{client_id}")
            .replace("{session}", "{session_id}")
            .replace("{token}", "{token_id}"),
        )
        for m, t, _ in ENDPOINTS
    }
    listed = {(m, p.replace("/rounds/1/", "/rounds/{round_number}/")) for m, p in listed}
    listed = {(m, p.replace("/privacy-audits/1", "/privacy-audits/{audit_id}")) for m, p in listed}
    listed = {
        (m, p.replace("/steps/0/activations/1", "/steps/{step}/{direction}/{sequence}")) for m, p in listed
    }
    assert served - public == listed


def test_role_matrix(api: Api) -> None:
    """One set-up, every (endpoint, principal) pair; the mismatches are reported together."""
    viewer = api.ok("POST", "/tokens", 201, json={"name": "viewer", "role": "viewer"})
    revoked = api.ok("POST", "/tokens", 201, json={"name": "gone", "role": "admin"})
    api.ok("DELETE", f"/tokens/{revoked['id']}")
    viewer_token = viewer["token"]
    client = enroll(api, "matrix-client")
    job_id = api.ok("POST", "/jobs", 201, json=job_spec(["matrix-client"]))["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    callers = {
        "nobody": api.as_(None),
        "forged": api.as_("flglm_at_forged"),
        "revoked": api.as_(revoked["token"]),  # an admin token until it was revoked: refused everywhere
        "viewer": api.as_(viewer_token),
        "client": client.api,
        "admin": api,
    }
    mismatches = []
    for method, template, allowed in ENDPOINTS:
        for role, caller in callers.items():
            if role == "admin" and "admin" in allowed:
                continue  # the admin's own calls would mutate the fixture (revoke, cancel); covered elsewhere
            status = _call(caller, method, template, job_id, client.client_id, viewer["id"])
            if role in ("nobody", "forged", "revoked"):
                expected_ok = status == 401
            elif role in allowed:
                expected_ok = status not in (401, 403)
            else:
                expected_ok = status == 403
            if not expected_ok:
                mismatches.append((method, template, role, status))
    assert mismatches == []
    # Forbidden answers carry the uniform error body.
    body = client.api.get("/jobs").json()
    assert body["error"]["code"] == "insufficient_role" and "viewer" in body["error"]["message"]


def test_clients_are_isolated_from_each_other(api: Api) -> None:
    a, b = enroll(api, "iso-a"), enroll(api, "iso-b")
    job_a = running_job(api, [a], min_clients=1)
    a.api.ok("POST", f"/agent/jobs/{job_a}/metrics", 201, json={"round_number": 1, "step": 0, "loss": 1.0})

    forbidden_for_b: list[Callable[[Agent], int]] = [
        lambda x: x.api.get(f"/agent/jobs/{job_a}").status_code,
        lambda x: (
            x.api.post(f"/agent/invitations/{job_a}/decision", json={"decision": "decline"}).status_code
        ),
        lambda x: x.api.post(f"/agent/jobs/{job_a}/rounds/1/done", json={"example_count": 1}).status_code,
        lambda x: x.api.post(f"/agent/jobs/{job_a}/metrics", json={"round_number": 1, "step": 1}).status_code,
    ]
    assert [probe(b) for probe in forbidden_for_b] == [404, 404, 404, 404]
    assert b.api.ok("GET", "/agent/invitations") == []
    assert b.api.ok("GET", "/agent/work")["assignments"] == []
    # Operator objects (other clients, jobs, metrics) are not reachable with a client credential.
    assert b.api.get(f"/clients/{a.client_id}").status_code == 403
    assert b.api.get("/metrics", params={"job_id": job_a}).status_code == 403
    # Nothing b tried changed a's job.
    assert api.ok("GET", "/metrics", params={"job_id": job_a})["total"] == 1
    assert api.ok("GET", f"/jobs/{job_a}/participants")[0]["consent"] == "approved"


def test_revoking_one_client_locks_it_out_at_once_and_leaves_others_alone(api: Api) -> None:
    a, b = enroll(api, "rev-a"), enroll(api, "rev-b")
    assert a.api.post("/agent/heartbeat", json={}).status_code == 200
    assert api.ok("POST", f"/clients/{a.client_id}/revoke")["status"] == "revoked"
    denied = a.api.post("/agent/heartbeat", json={})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_credential"
    assert b.api.post("/agent/heartbeat", json={}).status_code == 200
    # A revoked name cannot be re-enrolled with a new token.
    assert api.post("/clients/enrollment-tokens", json={"name": "rev-a"}).status_code == 409


def test_enrollment_tokens_are_one_time_and_expire(api: Api) -> None:
    token = api.ok("POST", "/clients/enrollment-tokens", 201, json={"name": "once"})["token"]
    enroll(api, "once", token)
    with pytest.raises(AssertionError, match="401"):
        enroll(api, "once", token)
    expired = api.ok("POST", "/clients/enrollment-tokens", 201, json={"name": "late", "expires_in_s": 0.001})
    time.sleep(0.01)
    with pytest.raises(AssertionError, match="401"):
        enroll(api, "late", expired["token"])
    assert api.ok("GET", "/clients", params={"status": "pending"})["total"] == 1


def test_bad_public_key_is_a_422_naming_the_field(api: Api) -> None:
    token = api.ok("POST", "/clients/enrollment-tokens", 201, json={"name": "badkey"})["token"]
    low_order = "A" * 43 + "="  # all zeros: a low-order point, every later upload would fail to open
    for key in ("not base64!", "AAAA", low_order):
        response = api.as_(None).post("/agent/enroll", json={"token": token, "public_key": key})
        assert response.status_code == 422
        assert "body.public_key" in response.json()["error"]["message"]
    # The token was not consumed by the rejected requests.
    enroll(api, "badkey", token)
