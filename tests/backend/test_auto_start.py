"""`start: auto` jobs start in housekeeping once min_clients approved clients are online (once, even racing
the operator); `start: manual` ones wait for the operator; `GET /jobs/{id}` says what they wait for."""

from __future__ import annotations

import threading
from datetime import timedelta

from fastapi import FastAPI

from backend.clients.service import heartbeat
from backend.housekeeping import run_housekeeping
from backend.models import utc_now
from tests.support.control_plane import Api, LiveServer, enroll, job_spec

LEASE_S = 60.0


def _approve(agent_api: Api, job_id: int) -> None:
    agent_api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})


def test_an_auto_job_starts_by_itself_once_enough_approved_clients_are_online(api: Api, app: FastAPI) -> None:
    a, b, c = enroll(api, "auto-a"), enroll(api, "auto-b"), enroll(api, "auto-c")
    job_id = api.ok("POST", "/jobs", 201, json=job_spec([a.name, b.name, c.name], min_clients=2))["id"]
    assert api.ok("GET", f"/jobs/{job_id}")["start"] == "auto"
    assert "flglm job open" in api.ok("GET", f"/jobs/{job_id}")["waiting_for"]
    api.ok("POST", f"/jobs/{job_id}/open")
    _approve(a.api, job_id)
    _approve(b.api, job_id)
    factory = app.state.session_factory
    # b falls silent past its lease: offline. One approved, online client of two: the job keeps waiting.
    later = utc_now() + timedelta(seconds=LEASE_S + 1)
    with factory() as session, session.begin():
        heartbeat(session, a.client_id, None, later)
        heartbeat(session, c.client_id, None, later)
    report = run_housekeeping(factory, later + timedelta(seconds=1), LEASE_S)
    assert report.clients_marked_offline == [b.client_id] and report.jobs_started == []
    job = api.ok("GET", f"/jobs/{job_id}")
    assert job["status"] == "waiting_for_clients"
    assert job["waiting_for"] == (
        "1 of 2 approved, online clients (min_clients); approved: auto-a, auto-b; offline: auto-b; "
        "not yet decided: auto-c"
    )
    # b comes back: the next pass starts the job, with the approved, online clients only (not c).
    b.api.ok("POST", "/agent/heartbeat", json={})
    assert run_housekeeping(factory, utc_now(), LEASE_S).jobs_started == [job_id]
    job = api.ok("GET", f"/jobs/{job_id}")
    assert (job["status"], job["current_round"], job["waiting_for"]) == ("running", 1, None)
    (round_,) = api.ok("GET", f"/jobs/{job_id}/rounds")
    assert sorted(p["client_id"] for p in round_["participants"]) == [a.client_id, b.client_id]
    assert run_housekeeping(factory, utc_now(), LEASE_S).jobs_started == []  # started once
    again = api.post(f"/jobs/{job_id}/start")
    assert again.status_code == 409 and again.json()["error"]["code"] == "illegal_transition"
    starts = api.ok("GET", "/audit", params={"limit": 200})["items"]
    assert [e["actor"] for e in starts if e["action"] == "job.start"] == ["system"]


def test_a_manual_job_waits_for_the_operator_and_says_so(api: Api, app: FastAPI) -> None:
    a = enroll(api, "manual-a")
    job_id = api.ok("POST", "/jobs", 201, json=job_spec([a.name], start="manual"))["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    _approve(a.api, job_id)
    assert run_housekeeping(app.state.session_factory, utc_now(), LEASE_S).jobs_started == []
    job = api.ok("GET", f"/jobs/{job_id}")
    assert (job["status"], job["start"]) == ("waiting_for_clients", "manual")
    assert job["waiting_for"] == (
        f"a manual start (`flglm job start {job_id}`); 1 of 1 approved, online clients (min_clients); "
        "approved: manual-a"
    )
    assert api.ok("POST", f"/jobs/{job_id}/start")["status"] == "running"


def test_a_ready_auto_job_says_it_is_about_to_start_and_bad_start_values_are_422(api: Api) -> None:
    a = enroll(api, "ready-a")
    job_id = api.ok("POST", "/jobs", 201, json=job_spec([a.name]))["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    _approve(a.api, job_id)
    assert api.ok("GET", f"/jobs/{job_id}")["waiting_for"].startswith("the next housekeeping pass")
    listed = api.ok("GET", "/jobs")["items"]
    assert [j["start"] for j in listed] == ["auto"]
    bad = api.post("/jobs", json=job_spec([a.name], start="sometimes"))
    assert bad.status_code == 422 and "start" in bad.text


def test_an_operator_start_racing_the_auto_start_starts_the_job_once(live_server: LiveServer) -> None:
    factory = live_server.app.state.session_factory
    with live_server.client() as http:
        api = Api(http)
        agent = enroll(api, "race-auto")
        for _ in range(4):
            job_id = api.ok("POST", "/jobs", 201, json=job_spec([agent.name]))["id"]
            api.ok("POST", f"/jobs/{job_id}/open")
            _approve(agent.api, job_id)
            barrier, results = threading.Barrier(2), dict[str, list[int]]()

            def housekeeping(barrier: threading.Barrier, results: dict[str, list[int]]) -> None:
                barrier.wait()
                results["auto"] = run_housekeeping(factory, utc_now(), LEASE_S).jobs_started

            thread = threading.Thread(target=housekeeping, args=(barrier, results))
            thread.start()
            barrier.wait()
            operator = api.post(f"/jobs/{job_id}/start").status_code
            thread.join()
            assert (operator == 200) != (results["auto"] == [job_id]), (operator, results)
            assert len(api.ok("GET", f"/jobs/{job_id}/rounds")) == 1
