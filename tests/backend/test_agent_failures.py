"""`POST /agent/jobs/{id}/failure`: an agent's fatal error fails the job (`straggler_policy: fail`, or too few
clients left) or drops the client (`drop`), with the reason in `GET /jobs/{id}`; bad reports get clear 4xx."""

from __future__ import annotations

import pytest

from flglm.protocol import AGENT_FAILURE_PATH, MAX_FAILURE_REASON_CHARS
from tests.support.control_plane import Api, enroll, job_spec, running_job

REASON = "ValueError: unknown model_ref 'tiny:lama'"


def _report(agent_api: Api, job_id: int, reason: str = REASON, expected: int = 200) -> dict[str, object]:
    body: dict[str, object] = agent_api.ok(
        "POST", AGENT_FAILURE_PATH.format(job_id=job_id), expected, json={"reason": reason}
    )
    return body


def test_under_the_fail_policy_a_reported_error_fails_the_job_with_its_reason(api: Api) -> None:
    a, b = enroll(api, "ff-a"), enroll(api, "ff-b")
    job_id = running_job(api, [a, b], min_clients=1, straggler_policy="fail")
    assert _report(a.api, job_id) == {"job_id": job_id, "job_status": "failed", "outcome": "job_failed"}
    job = api.ok("GET", f"/jobs/{job_id}")
    assert job["status"] == "failed"
    assert job["failure_reason"] == f"client ff-a reported a fatal error: {REASON}"
    assert job["client_failures"] == {"ff-a": REASON}
    (round_,) = api.ok("GET", f"/jobs/{job_id}/rounds")
    assert round_["status"] == "failed" and REASON in round_["close_reason"]
    assert _report(a.api, job_id)["outcome"] == "job_failed"  # a repeat answers the state
    late = b.api.post(AGENT_FAILURE_PATH.format(job_id=job_id), json={"reason": "too late"})
    assert late.status_code == 409 and late.json()["error"]["code"] == "job_not_running"


def test_under_the_drop_policy_the_client_leaves_and_the_job_goes_on(api: Api) -> None:
    a, b, c = enroll(api, "fd-a"), enroll(api, "fd-b"), enroll(api, "fd-c")
    job_id = running_job(api, [a, b, c], min_clients=2, rounds=2)
    assert _report(a.api, job_id)["outcome"] == "client_dropped"
    job = api.ok("GET", f"/jobs/{job_id}")
    assert (job["status"], job["failure_reason"], job["client_failures"]) == (
        "running",
        None,
        {"fd-a": REASON},
    )
    for agent in (b, c):
        agent.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 5})
    first, second = api.ok("GET", f"/jobs/{job_id}/rounds")
    dropped = {p["client_id"]: (p["status"], p["drop_reason"]) for p in first["participants"]}
    assert dropped[a.client_id] == ("dropped", f"reported a fatal error: {REASON}")
    assert first["status"] == "closed"
    # a takes no part in later rounds, although it is approved and online.
    assert sorted(p["client_id"] for p in second["participants"]) == [b.client_id, c.client_id]
    assert [w["job_id"] for w in a.api.ok("GET", "/agent/work")["assignments"]] == []


def test_under_the_drop_policy_too_few_clients_left_fails_the_job(api: Api) -> None:
    a, b = enroll(api, "fm-a"), enroll(api, "fm-b")
    job_id = running_job(api, [a, b], min_clients=2)
    assert _report(a.api, job_id) == {"job_id": job_id, "job_status": "failed", "outcome": "job_failed"}
    reason = api.ok("GET", f"/jobs/{job_id}")["failure_reason"]
    assert REASON in reason and "1 left, min_clients=2" in reason


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"reason": ""}, "reason"),
        ({"reason": "\x1b\n\t "}, "printable"),
        ({"reason": "x" * (MAX_FAILURE_REASON_CHARS + 1)}, "reason"),
        ({"reason": "ok", "data": "rows"}, "data"),
        ({}, "reason"),
    ],
)
def test_bad_reports_are_422_naming_the_field(api: Api, body: dict[str, object], words: str) -> None:
    a = enroll(api, "fb-a")
    job_id = running_job(api, [a])
    response = a.api.post(AGENT_FAILURE_PATH.format(job_id=job_id), json=body)
    assert response.status_code == 422 and words in response.text, response.text
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "running"


def test_control_characters_are_stripped_and_only_participants_of_running_jobs_report(api: Api) -> None:
    a, outsider = enroll(api, "fp-a"), enroll(api, "fp-out")
    waiting = api.ok("POST", "/jobs", 201, json=job_spec([a.name], start="manual"))["id"]
    api.ok("POST", f"/jobs/{waiting}/open")
    a.api.ok("POST", f"/agent/invitations/{waiting}/decision", json={"decision": "approve"})
    early = a.api.post(AGENT_FAILURE_PATH.format(job_id=waiting), json={"reason": REASON})
    assert early.status_code == 409 and early.json()["error"]["code"] == "job_not_running"
    api.ok("POST", f"/jobs/{waiting}/start")
    for who, job_id in ((outsider, waiting), (a, 999_999)):
        missing = who.api.post(AGENT_FAILURE_PATH.format(job_id=job_id), json={"reason": REASON})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    operator = api.post(AGENT_FAILURE_PATH.format(job_id=waiting), json={"reason": REASON})
    assert operator.status_code == 403
    _report(a.api, waiting, "boom\x1b[31m\n  red")
    assert api.ok("GET", f"/jobs/{waiting}")["client_failures"] == {"fp-a": "boom [31m red"}


def test_the_failure_route_is_documented_like_the_other_agent_routes(api: Api) -> None:
    operation = api.http.get("/openapi.json").json()["paths"]["/api/v1" + AGENT_FAILURE_PATH]["post"]
    assert operation["tags"] == ["agent"]
    assert {"200", "401", "403", "404", "409", "422"} <= set(operation["responses"])
    body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/AgentFailureRequest")
