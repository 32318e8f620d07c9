"""The whole job lifecycle through HTTP: create, invite, enroll, approve, start, rounds advance, complete."""

from __future__ import annotations

from tests.support.control_plane import Api, enroll, enrollment_token, job_spec, running_job


def test_job_lifecycle_end_to_end(api: Api) -> None:
    # The operator reserves two client names (one-time tokens) and invites them before they enroll.
    tokens = {name: enrollment_token(api, name) for name in ("hospital-a", "hospital-b")}
    job = api.ok("POST", "/jobs", 201, json=job_spec(["hospital-a", "hospital-b"], rounds=2))
    assert job["status"] == "draft"
    job_id = job["id"]
    assert api.ok("POST", f"/jobs/{job_id}/open")["status"] == "waiting_for_clients"

    a = enroll(api, "hospital-a", tokens["hospital-a"], example_count=120)
    b = enroll(api, "hospital-b", tokens["hospital-b"], example_count=80)
    assert a.client_id != b.client_id
    invitations = a.api.ok("GET", "/agent/invitations")
    assert [(i["job_id"], i["consent"]) for i in invitations] == [(job_id, "invited")]
    assert a.api.ok("GET", "/agent/work")["assignments"] == []  # nothing before approval and start

    for agent in (a, b):
        decided = agent.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
        assert decided["consent"] == "approved"
    participants = api.ok("GET", f"/jobs/{job_id}/participants")
    assert {p["client_name"]: p["consent"] for p in participants} == {
        "hospital-a": "approved",
        "hospital-b": "approved",
    }

    started = api.ok("POST", f"/jobs/{job_id}/start")
    assert (started["status"], started["current_round"]) == ("running", 1)

    for round_number in (1, 2):
        for agent in (a, b):
            work = agent.api.ok("GET", "/agent/work")["assignments"]
            assert [(w["job_id"], w["round_number"], w["steps"]) for w in work] == [(job_id, round_number, 5)]
            assert work[0]["job"]["server_public_key"]
            for step in range(2):
                agent.api.ok(
                    "POST",
                    f"/agent/jobs/{job_id}/metrics",
                    201,
                    json={
                        "round_number": round_number,
                        "step": step,
                        "loss": 2.0 - 0.1 * step,
                        "tokens": 512,
                        "phase_timings_s": {"front": 0.01, "wait_h1": 0.05, "back": 0.02},
                        "wire_bytes_up": 4096,
                        "wire_bytes_down": 4096,
                    },
                )
        first = a.api.ok(
            "POST",
            f"/agent/jobs/{job_id}/rounds/{round_number}/done",
            json={"example_count": 120, "eval_metrics": {}},
        )
        assert first["round_status"] == "open"
        # Repeating a report is harmless.
        again = a.api.ok(
            "POST", f"/agent/jobs/{job_id}/rounds/{round_number}/done", json={"example_count": 120}
        )
        assert again["round_status"] == "open"
        last = b.api.ok(
            "POST",
            f"/agent/jobs/{job_id}/rounds/{round_number}/done",
            json={"example_count": 80, "eval_metrics": {"accuracy": 0.5}},
        )
        assert last["round_status"] == "closed"

    final = api.ok("GET", f"/jobs/{job_id}")
    assert (final["status"], final["current_round"]) == ("completed", 2)
    rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
    assert [(r["number"], r["status"]) for r in rounds] == [(1, "closed"), (2, "closed")]
    assert {p["status"] for r in rounds for p in r["participants"]} == {"finished"}
    assert a.api.ok("GET", "/agent/work")["assignments"] == []

    metrics = api.ok(
        "GET", "/metrics", params={"job_id": job_id, "round_number": 2, "client_id": b.client_id}
    )
    assert metrics["total"] == 2 and [m["step"] for m in metrics["items"]] == [0, 1]
    assert metrics["items"][0]["phase_timings_s"]["wait_h1"] == 0.05

    actions = [
        e["action"] for e in api.ok("GET", "/audit", params={"object_type": "job", "limit": 500})["items"]
    ]
    for expected in ("job.create", "job.open", "job.start", "round.open", "round.close", "job.complete"):
        assert expected in actions
    assert actions.count("round.close") == 2


def test_consent_gates_work_metrics_and_start(api: Api) -> None:
    a, b, c = (enroll(api, name) for name in ("owner-a", "owner-b", "owner-c"))
    job = api.ok("POST", "/jobs", 201, json=job_spec(["owner-a", "owner-b", "owner-c"], min_clients=2))
    job_id = job["id"]
    # Drafts are invisible to agents; invitations appear once the job is opened.
    assert a.api.ok("GET", "/agent/invitations") == []
    api.ok("POST", f"/jobs/{job_id}/open")
    a.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    b.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "decline"})
    refused = api.post(f"/jobs/{job_id}/start")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_enough_participants"
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "waiting_for_clients"

    c.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    api.ok("POST", f"/jobs/{job_id}/start")
    rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
    assert sorted(p["client_id"] for p in rounds[0]["participants"]) == sorted([a.client_id, c.client_id])

    # The client that declined never gets work, cannot report, cannot post metrics.
    assert b.api.ok("GET", "/agent/work")["assignments"] == []
    assert b.api.post(f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 1}).status_code == 404
    assert b.api.post(f"/agent/jobs/{job_id}/metrics", json={"round_number": 1, "step": 0}).status_code == 404
    # Approvals close when training starts; a late approval is a conflict.
    late = b.api.post(f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    assert late.status_code == 409 and late.json()["error"]["code"] == "consent_closed"


def test_withdrawal_during_a_round_applies_the_policy(api: Api) -> None:
    a, b = enroll(api, "w-a"), enroll(api, "w-b")
    job_id = running_job(api, [a, b], min_clients=2, rounds=3)
    other_job = running_job(api, [a, b], min_clients=2, rounds=3)  # b stays in this one
    a.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 3})
    # b withdraws: only one participant is left, below min_clients, so the job fails.
    b.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "decline"})
    job = api.ok("GET", f"/jobs/{job_id}")
    assert job["status"] == "failed" and "withdrew consent" in job["failure_reason"]
    assert api.ok("GET", f"/jobs/{job_id}/rounds")[0]["status"] == "failed"
    # Withdrawing from one job leaves b's other jobs alone.
    assert api.ok("GET", f"/jobs/{other_job}")["status"] == "running"
    assert api.ok("GET", f"/jobs/{other_job}/rounds")[0]["status"] == "open"


def test_a_refused_submission_takes_no_job_id(api: Api) -> None:
    """Unknown or revoked invitees are refused before the job row exists (PostgreSQL sequences never roll
    back, so a refusal after the insert used to skip an id)."""
    first = api.ok("POST", "/jobs", 201, json=job_spec([]))["id"]
    refused = api.post("/jobs", json=job_spec(["nobody-by-this-name"]))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_clients"
    assert "nobody-by-this-name" in refused.json()["error"]["message"]
    assert api.ok("POST", "/jobs", 201, json=job_spec([]))["id"] == first + 1
    assert api.ok("GET", "/jobs")["total"] == 2  # nothing half-written by the refused one
