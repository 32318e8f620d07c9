"""`GET /metrics/jobs/{id}/progress`: per-client step and traffic, replica assignment, viewer access."""

from __future__ import annotations

from tests.support.control_plane import Api, enroll, job_spec, running_job


def test_progress_reports_each_clients_latest_step_traffic_and_replica(api: Api) -> None:
    agents = [enroll(api, name) for name in ("hospital-a", "hospital-b", "hospital-c")]
    job_id = running_job(api, agents, parallel_mode="server_hierarchical", replicas=2)
    for step, loss in enumerate([2.5, 2.0, 1.5]):
        agents[0].api.ok(
            "POST",
            f"/agent/jobs/{job_id}/metrics",
            201,
            json={"round_number": 1, "step": step, "loss": loss, "tokens": 100, "wire_bytes_up": 10},
        )
    agents[2].api.ok(
        "POST",
        f"/agent/jobs/{job_id}/metrics",
        201,
        json={"round_number": 1, "step": 0, "loss": 3.0, "tokens": 50, "wire_bytes_down": 7},
    )

    viewer = api.ok("POST", "/tokens", 201, json={"name": "watcher", "role": "viewer"})["token"]
    progress = api.as_(viewer).ok("GET", f"/metrics/jobs/{job_id}/progress")

    assert progress["status"] == "running" and progress["current_round"] == 1
    assert (progress["steps_reported"], progress["tokens"]) == (4, 350)
    assert (progress["wire_bytes_up"], progress["wire_bytes_down"]) == (30, 7)
    by_name = {c["client_name"]: c for c in progress["clients"]}
    a, b, c = by_name["hospital-a"], by_name["hospital-b"], by_name["hospital-c"]
    assert (a["round_number"], a["step"], a["last_loss"], a["tokens"]) == (1, 2, 1.5, 300)
    assert (b["step"], b["steps_reported"], b["last_loss"]) == (None, 0, None)
    assert c["step"] == 0 and c["wire_bytes_down"] == 7
    assert all(client["consent"] == "approved" for client in progress["clients"])
    # Dealt round-robin in invitation order over 2 replicas.
    assert (a["replica"], b["replica"], c["replica"]) == (0, 1, 0)
    replicas = {r["replica"]: r for r in progress["replicas"]}
    assert replicas[0]["client_ids"] == [a["client_id"], c["client_id"]]
    assert replicas[1]["client_ids"] == [b["client_id"]]
    # Replica 0's clients a and c share their step 0 in one batch (server_hierarchical batches a replica's
    # clients): 4 reports, 3 server steps.
    assert (replicas[0]["steps_in_window"], replicas[1]["steps_in_window"]) == (3, 0)
    assert replicas[1]["tokens_per_s"] is None
    # Enrolling is no heartbeat: a client is online only once its agent heartbeats (within the lease).
    assert not any(client["online"] or client["last_heartbeat_at"] for client in progress["clients"])
    agents[1].api.ok("POST", "/agent/heartbeat", json={})
    progress = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    online = {c["client_name"]: c["online"] for c in progress["clients"]}
    assert online == {"hospital-a": False, "hospital-b": True, "hospital-c": False}


def test_batched_server_steps_count_once_and_an_ended_job_has_no_live_throughput(api: Api) -> None:
    agents = [enroll(api, name) for name in ("batch-a", "batch-b")]
    job_id = running_job(api, agents, parallel_mode="client_batch", rounds=1, steps_per_round=6)
    for step in range(6):
        for agent in agents:
            body = {
                "round_number": 1,
                "step": step,
                "loss": 2.0,
                "tokens": 100,
                "phase_timings_s": {"step": 0.5},
            }
            agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json=body)
    progress = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    assert [r["steps_in_window"] for r in progress["replicas"]] == [6]  # 12 reports, 6 batched server steps
    assert progress["tokens_per_s"] is not None and progress["replicas"][0]["tokens_per_s"] is not None
    api.ok("POST", f"/jobs/{job_id}/cancel")
    ended = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    assert ended["status"] == "cancelled" and ended["tokens"] == 1200
    assert ended["tokens_per_s"] is None and ended["replicas"][0]["tokens_per_s"] is None

    sequential = running_job(api, agents, parallel_mode="sequential", rounds=1, steps_per_round=2)
    for agent in agents:
        agent.api.ok(
            "POST", f"/agent/jobs/{sequential}/metrics", 201, json={"round_number": 1, "step": 0, "tokens": 5}
        )
    progress = api.ok("GET", f"/metrics/jobs/{sequential}/progress")
    assert [r["steps_in_window"] for r in progress["replicas"]] == [2]  # one server step per client in turn


def test_a_resent_step_metric_is_kept_once_the_first_report_stands(api: Api) -> None:
    agent = enroll(api, "resender")
    job_id = running_job(api, [agent])
    first = {"round_number": 1, "step": 0, "loss": 2.5, "tokens": 100}
    created = agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json=first)
    again = agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json={**first, "loss": 9.0})
    assert again["id"] == created["id"] and again["loss"] == 2.5
    metrics = api.ok("GET", "/metrics", params={"job_id": job_id})["items"]
    assert [(m["step"], m["loss"]) for m in metrics] == [(0, 2.5)]
    progress = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    assert (progress["steps_reported"], progress["tokens"]) == (1, 100)


def test_progress_of_unknown_job_is_404_and_needs_a_token(api: Api) -> None:
    assert api.get("/metrics/jobs/999/progress").status_code == 404
    assert api.as_(None).get("/metrics/jobs/999/progress").status_code == 401


def test_replicas_follow_the_worker_spec_published_at_start(api: Api) -> None:
    agents = [enroll(api, name) for name in ("site-a", "site-b", "site-c")]
    spec = job_spec([a.name for a in agents], parallel_mode="server_hierarchical", replicas=2, min_clients=2)
    job_id = api.ok("POST", "/jobs", 201, json=spec)["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    for agent in agents:
        agent.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    # Before the start the page shows how the approved clients will be dealt.
    planned = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    assert [c["replica"] for c in planned["clients"]] == [0, 1, 0]

    # site-c is revoked before the start, so the workers never serve it.
    api.ok("POST", f"/clients/{agents[2].client_id}/revoke")
    api.ok("POST", f"/jobs/{job_id}/start")
    served = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    assert [c["replica"] for c in served["clients"]] == [0, 1, None]
    assert [r["client_ids"] for r in served["replicas"]] == [[agents[0].client_id], [agents[1].client_id]]
