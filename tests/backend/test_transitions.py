"""Illegal transitions → 409 with nothing written; round policies on deadlines, leases and operator close."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from apps.server import create_server_app
from backend.clients.service import heartbeat
from backend.housekeeping import run_housekeeping
from backend.models import utc_now
from backend.settings import Settings
from tests.support.control_plane import Api, enroll, job_spec, running_job


def _audit_total(api: Api) -> int:
    total: int = api.ok("GET", "/audit")["total"]
    return total


def _row_counts(app: FastAPI) -> dict[str, int]:
    with app.state.engine.connect() as conn:
        tables = ("jobs", "rounds", "round_participants", "job_participants", "step_metrics", "audit_events")
        return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}


# state reached by a sequence of actions → actions that must be refused there
ILLEGAL = {
    "draft": ["start", "pause", "resume"],
    "waiting_for_clients": ["open", "pause", "resume"],
    "running": ["open", "start", "resume"],
    "paused": ["open", "start", "pause"],
    "cancelled": ["open", "start", "pause", "resume", "cancel"],
}
PATHS = {
    "draft": [],
    "waiting_for_clients": ["open"],
    "running": ["open", "start"],
    "paused": ["open", "start", "pause"],
    "cancelled": ["open", "start", "cancel"],
}


@pytest.mark.parametrize("state", list(ILLEGAL))
def test_illegal_transitions_are_409_and_change_nothing(api: Api, app: FastAPI, state: str) -> None:
    agent = enroll(api, "t-agent")
    job_id = api.ok("POST", "/jobs", 201, json=job_spec(["t-agent"]))["id"]
    for action in PATHS[state]:
        if action == "start":
            agent.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
        api.ok("POST", f"/jobs/{job_id}/{action}")
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == state
    before = _row_counts(app)
    for action in ILLEGAL[state]:
        response = api.post(f"/jobs/{job_id}/{action}")
        assert response.status_code == 409, (state, action, response.text)
        assert response.json()["error"]["code"] == "illegal_transition"
        assert state in response.json()["error"]["message"]
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == state
    assert _row_counts(app) == before


def test_pause_resume_and_completed_is_final(api: Api) -> None:
    a = enroll(api, "p-a")
    job_id = running_job(api, [a], rounds=1)
    assert api.ok("POST", f"/jobs/{job_id}/pause")["status"] == "paused"
    assert a.api.ok("GET", "/agent/work")["assignments"] == []  # no work while paused
    paused_report = a.api.post(f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 1})
    assert paused_report.status_code == 409 and paused_report.json()["error"]["code"] == "job_not_running"
    assert api.ok("POST", f"/jobs/{job_id}/resume")["status"] == "running"
    a.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 1})
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    for action in ("open", "start", "pause", "resume", "cancel"):
        assert api.post(f"/jobs/{job_id}/{action}").status_code == 409
    stale = a.api.post(f"/agent/jobs/{job_id}/rounds/2/done", json={"example_count": 1})
    assert stale.status_code == 404 and stale.json()["error"]["code"] == "round_not_found"


def test_deadline_drops_stragglers_when_enough_finished(api: Api, app: FastAPI) -> None:
    a, b, c = (enroll(api, n) for n in ("d-a", "d-b", "d-c"))
    job_id = running_job(api, [a, b, c], min_clients=2, rounds=2, round_timeout_s=30)
    a.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 5})
    b.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 5})
    # Before the deadline nothing happens; after it, c is dropped and round 2 opens with everyone online.
    factory, lease = app.state.session_factory, 3600.0
    assert run_housekeeping(factory, utc_now() + timedelta(seconds=10), lease).rounds_closed_by_deadline == []
    report = run_housekeeping(factory, utc_now() + timedelta(seconds=31), lease)
    assert report.rounds_closed_by_deadline == [(job_id, 1)]
    rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
    dropped = {p["client_id"]: p["status"] for p in rounds[0]["participants"]}
    assert dropped == {a.client_id: "finished", b.client_id: "finished", c.client_id: "dropped"}
    assert (rounds[1]["number"], rounds[1]["status"], len(rounds[1]["participants"])) == (2, "open", 3)
    late = c.api.post(f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 5})
    assert late.status_code == 409 and late.json()["error"]["code"] == "stale_round"


def test_deadline_fails_the_job_when_too_few_finished(api: Api, app: FastAPI) -> None:
    a, b = enroll(api, "f-a"), enroll(api, "f-b")
    job_id = running_job(api, [a, b], min_clients=2, round_timeout_s=30)
    a.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 5})
    run_housekeeping(app.state.session_factory, utc_now() + timedelta(seconds=31), 3600.0)
    job = api.ok("GET", f"/jobs/{job_id}")
    assert job["status"] == "failed" and "deadline passed" in job["failure_reason"]


def test_fail_policy_fails_on_any_straggler(api: Api, app: FastAPI) -> None:
    a, b = enroll(api, "s-a"), enroll(api, "s-b")
    job_id = running_job(api, [a, b], min_clients=1, round_timeout_s=30, straggler_policy="fail")
    a.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 5})
    run_housekeeping(app.state.session_factory, utc_now() + timedelta(seconds=31), 3600.0)
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "failed"


def test_silent_client_goes_offline_and_the_round_closes_without_it(api: Api, app: FastAPI) -> None:
    a, b = enroll(api, "h-a"), enroll(api, "h-b")
    job_id = running_job(api, [a, b], min_clients=1, rounds=2)
    a.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 5})
    later = utc_now() + timedelta(seconds=61)
    # a keeps heartbeating (its lease is renewed "later"); b stays silent past the 60 s lease.
    with app.state.session_factory() as session, session.begin():
        heartbeat(session, a.client_id, None, later)
    report = run_housekeeping(app.state.session_factory, later + timedelta(seconds=1), 60.0)
    assert report.clients_marked_offline == [b.client_id]
    assert api.ok("GET", f"/clients/{b.client_id}")["status"] == "offline"
    rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
    assert rounds[0]["status"] == "closed"
    assert [p["client_id"] for p in rounds[1]["participants"]] == [a.client_id]  # offline b is left out
    # b heartbeats again: online, and it takes part from the next round on.
    assert b.api.ok("POST", "/agent/heartbeat", json={"example_count": 7})["status"] == "active"
    assert api.ok("GET", f"/clients/{b.client_id}")["example_count"] == 7


def test_operator_close_round_applies_the_policy(api: Api) -> None:
    a, b = enroll(api, "c-a"), enroll(api, "c-b")
    job_id = running_job(api, [a, b], min_clients=1, rounds=1)
    a.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 5})
    closed = api.ok("POST", f"/jobs/{job_id}/rounds/1/close")
    assert closed["status"] == "closed"
    assert {p["status"] for p in closed["participants"]} == {"finished", "dropped"}
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    again = api.post(f"/jobs/{job_id}/rounds/1/close")
    assert again.status_code == 409 and again.json()["error"]["code"] == "stale_round"


def test_the_app_enforces_deadlines_by_itself(settings: Settings) -> None:
    """With the housekeeping loop on, an overdue round is handled without anyone calling in."""
    looping = settings.model_copy(update={"deadline_check_interval_s": 0.1})
    with TestClient(create_server_app(looping)) as client:
        api = Api(client)
        a, b = enroll(api, "loop-a"), enroll(api, "loop-b")
        job_id = running_job(api, [a, b], min_clients=2, round_timeout_s=0.3)
        status = "running"
        for _ in range(200):
            status = api.ok("GET", f"/jobs/{job_id}")["status"]
            if status != "running":
                break
            time.sleep(0.05)
        assert status == "failed"
