"""A real `flglm agent run` whose data does not fit the job tells the server, so the job fails at once, with
the reason in `GET /jobs/{id}` (not at its round deadline), and the reason holds nothing of the data."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.support.agent_processes import make_agent, wait_until
from tests.support.control_plane import Api, LiveServer, job_spec


def test_an_agent_whose_data_does_not_fit_fails_the_job_with_the_reason(
    tmp_path: Path, live_server: LiveServer, api: Api
) -> None:
    agent = make_agent(tmp_path, api, live_server, "misfit", 0, live_server.base_url)
    spec = job_spec(
        [agent.name],
        name="labels-that-do-not-fit",
        model_ref="tiny:llama:0",
        hyperparameters={"lr": 1e-3, "batch_size": 2, "labels": ["alpha", "beta"]},
        min_clients=1,
        round_timeout_s=3600,
        straggler_policy="fail",
        start="manual",
    )
    job_id = api.ok("POST", "/jobs", 201, json=spec)["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    assert agent.cli("approve", str(job_id)).returncode == 0
    process = agent.start_run("--stop-when-done")
    try:
        api.ok("POST", f"/jobs/{job_id}/start")
        assert process.wait(timeout=180) == 2, agent.log.read_text()[-3000:]  # bad data, as before
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
    job = wait_until(
        lambda: (j := api.ok("GET", f"/jobs/{job_id}"))["status"] == "failed" and j, 10, "failure"
    )
    reason = "the data owner's data does not fit the job (DataError; the details stay with the data owner)"
    assert job["failure_reason"] == f"client misfit reported a fatal error: {reason}"
    assert job["client_failures"] == {"misfit": reason}
    assert "unknown label" in agent.log.read_text()  # the owner sees the details; the server does not
