"""Fault injection with real processes (slow): the control plane, its Celery workers and the data owners'
agents are subprocesses on PostgreSQL and Redis, and each test kills or cuts off one of them mid-round.

The stack (tests/support/fault_stack.py): `flglm serve --self-signed` with `FLGLM_EXECUTOR=celery` on a
fresh PostgreSQL schema of this module (dropped after), Redis database 8 (this module's own, emptied
first; tests/e2e/test_privacy_celery.py has 9), one `flglm worker` for replica 0, and two `flglm agent
run --stop-when-done` processes training a 2-round x 2-step classification job of the tiny Llama.

After every fault the job must complete with every client step applied exactly once by the worker's
replica (`server_steps` and the `applied` step keys), the audit log must record the job's start and
completion, and no round or participant may be left open.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from backend.db import drop_postgres_schema, fresh_postgres_schema
from tests.support.agent_processes import LABELS, MODEL_REF, AgentProcess, make_agent_process, wait_until
from tests.support.celery_workers import WorkerProcesses
from tests.support.control_plane import Api, job_spec
from tests.support.fault_stack import (
    CuttableProxy,
    PrivateRedis,
    ServeProcess,
    flushed_redis_db,
    replica_counters,
)

pytestmark = pytest.mark.slow
ROUNDS, STEPS, AGENTS = 2, 2, 2
REDIS_DB = 8  # this module's own Redis database
PG_SCHEMA = f"flglm_test_faults_{os.getpid()}"


@pytest.fixture
def fault_database_url(postgres_url: str) -> Iterator[str]:
    yield fresh_postgres_schema(postgres_url, PG_SCHEMA)
    drop_postgres_schema(postgres_url, PG_SCHEMA)


@dataclass
class Stack:
    tmp_path: Path
    serve: ServeProcess
    workers: WorkerProcesses
    agents: list[AgentProcess] = field(default_factory=list)
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    apis: list[Api] = field(default_factory=list)

    def api(self) -> Api:
        api = self.serve.api()
        self.apis.append(api)
        return api

    def enroll_agents(self, urls: list[str]) -> None:
        api = self.api()
        for i, url in enumerate(urls):
            agent = make_agent_process(self.tmp_path, api, self.serve.ca_cert, f"owner-{i}", i, url)
            self.agents.append(agent)

    def start_job(
        self,
        hyperparameters: dict[str, Any] | None = None,
        run_args: tuple[str, ...] = (),
        **overrides: Any,
    ) -> int:
        """Create and open the job, approve it through every agent's CLI, start their runs (`flglm agent run
        --stop-when-done`, plus `run_args`) and the job; `hyperparameters` are added to the default ones,
        `overrides` replace spec fields."""
        api = self.api()
        spec = job_spec(
            [a.name for a in self.agents],
            name="faults",
            model_ref=MODEL_REF,
            task_type="classification",
            adapter={"r": 4, "alpha": 8},
            hyperparameters={"lr": 5e-3, "batch_size": 3, "labels": LABELS, "max_batch_size": 16,
                             "max_seq_len": 64, **(hyperparameters or {})},
            parallel_mode="sequential",
            rounds=ROUNDS,
            steps_per_round=STEPS,
            min_clients=AGENTS,
            start="manual",  # started below, once every agent is online
        )  # fmt: skip
        spec.update(overrides)
        job_id: int = api.ok("POST", "/jobs", 201, json=spec)["id"]
        api.ok("POST", f"/jobs/{job_id}/open")
        for agent in self.agents:
            decided = agent.cli("approve", str(job_id))
            assert decided.returncode == 0 and "approved" in decided.stdout, decided.stderr
        self.runs = [agent.start_run("--stop-when-done", *run_args) for agent in self.agents]

        def all_online() -> bool:  # a job with min_clients 1 would start without a late agent
            clients = api.ok("GET", "/clients", params={"limit": 100})["items"]
            names = {agent.name for agent in self.agents}
            return all(c["status"] == "active" for c in clients if c["name"] in names)

        wait_until(all_online, 60, "every agent online (heartbeating)", interval=0.5)
        wait_until(
            lambda: api.post(f"/jobs/{job_id}/start").status_code == 200,
            60,
            "the job to start (every approved agent online)",
            interval=0.5,
        )
        return job_id

    def wait_for_position(self, index: int, job_id: int, round_number: int, next_step: int) -> None:
        def there() -> bool:
            position = self.agents[index].position(job_id)
            return position is not None and (position["round_number"], position["next_step"]) >= (
                round_number,
                next_step,
            )

        wait_until(there, 120, f"agent {index} to reach round {round_number} step {next_step}")

    def wait_agents_done(self, timeout: float = 180) -> None:
        """Every agent run exits 0; fails at the first one that exits otherwise (with its log's tail)."""

        def all_exited() -> bool:
            for process, agent in zip(self.runs, self.agents, strict=True):
                code = process.poll()
                assert code in (None, 0), f"{agent.name} exited {code}:\n{agent.log.read_text()[-3000:]}"
            return all(process.poll() == 0 for process in self.runs)

        wait_until(all_exited, timeout, "the agents to finish the job", interval=0.5)

    def signal_agents(self, signum: int) -> None:
        for process in self.runs:
            process.send_signal(signum)

    def close(self) -> None:
        for process in self.runs:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for api in self.apis:
            api.http.close()
        self.workers.stop_all()
        self.serve.stop()


@pytest.fixture
def serve_env() -> dict[str, str]:
    """Extra environment of `flglm serve` (a test parametrizes it)."""
    return {}


@pytest.fixture
def stack(
    tmp_path: Path, fault_database_url: str, redis_url: str, serve_env: dict[str, str]
) -> Iterator[Stack]:
    """The backend (started), one worker for replica 0; the test enrolls the agents."""
    url = flushed_redis_db(redis_url, REDIS_DB)
    serve = ServeProcess(tmp_path / "data", fault_database_url, url, tmp_path, env=serve_env)
    serve.start()
    workers = WorkerProcesses(url, serve.server_key_file, tmp_path)
    workers.start(0)
    running = Stack(tmp_path, serve, workers)
    yield running
    running.close()


def assert_completed_cleanly(stack: Stack, job_id: int) -> list[dict[str, Any]]:
    """The job completed, every round closed, no participant left active, the audit log has the job's start
    and completion, and the worker applied every client step exactly once. Returns the audit entries."""
    api = stack.api()
    job = api.ok("GET", f"/jobs/{job_id}")
    assert job["status"] == "completed", job
    rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
    assert [r["status"] for r in rounds] == ["closed"] * ROUNDS, rounds
    for round_ in rounds:
        assert all(p["status"] != "active" for p in round_["participants"]), round_
    params = {"object_type": "job", "object_id": str(job_id), "limit": 200}
    entries: list[dict[str, Any]] = api.ok("GET", "/audit", params=params)["items"]
    actions = [e["action"] for e in entries]
    assert actions.count("job.start") == 1 and actions.count("job.complete") == 1, actions
    # Exactly once: the replica's `applied` step keys ("round:step:client") are every step of every
    # finished participant (a dropped one's steps of its round may be there or not), and it stepped its
    # optimizer once per applied key.
    counters = replica_counters(stack.serve.redis_url, job_id)
    applied = set(counters["applied"])
    assert len(applied) == len(counters["applied"]) == counters["server_steps"], counters
    finished = {
        f"{r['number']}:{step}:{p['client_id']}"
        for r in rounds
        for p in r["participants"]
        if p["status"] == "finished"
        for step in range(STEPS)
    }
    may_have = {
        f"{r['number']}:{step}:{p['client_id']}"
        for r in rounds
        for p in r["participants"]
        if p["status"] == "dropped"
        for step in range(STEPS)
    }
    assert finished <= applied <= finished | may_have, (sorted(applied), sorted(finished))
    return entries


def staged_uploads(redis_url: str) -> list[bytes]:
    """Uploads the backend staged and is waiting for a worker to admit (`staging:msg:...` blob keys)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return list(client.scan_iter(match="*staging:msg:*"))
    finally:
        client.close()


def test_backend_sigkilled_mid_round_and_restarted_the_job_completes_applying_every_step_once(
    stack: Stack,
) -> None:
    """SIGKILL `flglm serve` after agent 0's first step and restart it on the same port, data directory and
    PostgreSQL database while the agents retry (their StepClient backoff: 6 retries, 0.25 s doubling to
    8 s, at least ~8 s in all; the outage lasts the 1 s pause plus the restart). The agents are frozen
    (SIGSTOP) for the kill itself, so that no upload is half-way through the backend when it dies: that
    case is the next test's."""
    stack.enroll_agents([stack.serve.base_url] * AGENTS)
    job_id = stack.start_job()
    stack.wait_for_position(0, job_id, 1, 1)
    stack.signal_agents(signal.SIGSTOP)
    time.sleep(1.0)  # what the agents had sent is processed; a long-poll may still be waiting: it dies
    wait_until(lambda: not staged_uploads(stack.serve.redis_url), 30, "no upload awaiting admission")
    stack.serve.kill()
    stack.signal_agents(signal.SIGCONT)
    time.sleep(1.0)  # the agents meet a dead backend: connection refused, retried
    restart_s = stack.serve.start()
    stack.wait_agents_done()
    assert_completed_cleanly(stack, job_id)
    assert "PUT /api/v1/agent/jobs/" in stack.serve.log_tail(100_000)  # they went on after the restart
    assert restart_s < 30, restart_s


def test_backend_sigkilled_while_an_upload_awaits_admission_the_retry_is_accepted(stack: Stack) -> None:
    """The worker is frozen (SIGSTOP) so that an upload waits for its admission task in the backend;
    the backend is SIGKILLed then, the worker thawed (it admits the staged upload: the sequence number is
    taken) and the backend restarted. The agent's retry of the same sealed bytes must be taken as the
    identical duplicate it is, and the job must complete with every step applied once. (Before df8aced the
    sequence guard refused it for good: 409 replayed_message, the agent exited 7, the round never ended.)"""
    stack.enroll_agents([stack.serve.base_url] * AGENTS)
    job_id = stack.start_job()
    worker = stack.workers.processes[0]
    # Frozen as soon as the round opens: the agents' first uploads (round 1, step 0) must wait for it.
    # Freezing it later races the agents: both may be long-polling results, with no upload to catch.
    worker.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: staged_uploads(stack.serve.redis_url), 60, "an upload awaiting admission")
        stack.serve.kill()
    finally:
        worker.send_signal(signal.SIGCONT)
    stack.serve.start()
    stack.wait_agents_done()
    assert_completed_cleanly(stack, job_id)


CUT_S = 120  # the outage: far longer than one request's retries (~16 s)


@pytest.mark.parametrize("serve_env", [{"FLGLM_HEARTBEAT_LEASE_S": str(CUT_S + 60)}])
def test_agent_cut_off_for_two_minutes_rides_it_out_and_the_job_completes(stack: Stack) -> None:
    """Cut agent 1's connections (reset, and new ones refused) for 2 minutes mid-round. Its requests retry
    for ~16 s and fail; the agent keeps trying every 15 s (`--max-outage`, 900 s by default), stays alive,
    and once the link is back resumes from its state directory (a new forward supersedes the one whose
    result it lost) and the job completes with every step applied once. The backend's heartbeat lease
    (here 3 minutes; 60 s by default) is what decides how long a silent agent keeps its place: shorter
    than the cut, it would be dropped (the next test)."""
    proxy = CuttableProxy(stack.serve.port)
    try:
        stack.enroll_agents([stack.serve.base_url, proxy.url])
        job_id = stack.start_job()
        stack.wait_for_position(1, job_id, 1, 1)
        proxy.cut()
        time.sleep(CUT_S)
        assert stack.runs[1].poll() is None, stack.agents[1].log.read_text()[-3000:]
        proxy.restore()
        stack.wait_agents_done()
        log = stack.agents[1].log.read_text()
        assert "server unreachable for" in log and "server reachable again after" in log, log[-3000:]
        assert proxy.refused > 0
        assert_completed_cleanly(stack, job_id)
        rounds = stack.api().ok("GET", f"/jobs/{job_id}/rounds")
        assert all(p["status"] == "finished" for r in rounds for p in r["participants"]), rounds
    finally:
        proxy.close()


@pytest.mark.parametrize("serve_env", [{"FLGLM_HEARTBEAT_LEASE_S": "20"}])
def test_agent_cut_off_for_good_is_dropped_as_offline_and_the_job_completes_without_it(
    stack: Stack,
) -> None:
    """Cut agent 1 off after its first step and never restore it: it gives up (exit 5) after its
    `--max-outage` (10 s here), its heartbeats stop,
    and once its lease runs out (20 s here, 60 s by default; above the agents' 15 s heartbeat interval)
    the backend marks it offline and drops it from the open round (straggler policy `drop`, min_clients
    1). Agent 0 finishes the job alone; the audit log says who was dropped from which round.

    The replica learns of the drop (`flglm.drop_client`, queued once the drop is committed): agent 1's
    forward graph, left in flight on the (sequential) replica by the cut, stops holding agent 0's next step
    at once, not after the job's `inflight_timeout_s` (600 s, the default here)."""
    proxy = CuttableProxy(stack.serve.port)
    try:
        stack.enroll_agents([stack.serve.base_url, proxy.url])
        job_id = stack.start_job(None, ("--max-outage", "10"), min_clients=1, straggler_policy="drop")
        stack.wait_for_position(1, job_id, 1, 1)
        proxy.cut()
        assert stack.runs[1].wait(timeout=60) == 5, stack.agents[1].log.read_text()[-3000:]
        assert stack.runs[0].wait(timeout=120) == 0, stack.agents[0].log.read_text()[-3000:]
    finally:
        proxy.close()
    entries = assert_completed_cleanly(stack, job_id)
    dropped_id = json.loads((stack.agents[1].state_dir / "credential.json").read_text())["client_id"]
    rounds = stack.api().ok("GET", f"/jobs/{job_id}/rounds")
    first = {p["client_id"]: p for p in rounds[0]["participants"]}
    assert first[dropped_id]["status"] == "dropped" and first[dropped_id]["drop_reason"] == "offline", first
    assert dropped_id not in {p["client_id"] for p in rounds[1]["participants"]}, rounds[1]
    drops = [e["detail"] for e in entries if e["action"] == "round.drop_client"]
    assert drops == [{"round": 1, "client_id": dropped_id}], drops


@pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="no redis-server binary on this machine: this test restarts a private one (not the shared Redis)",
)
def test_redis_restarted_mid_round_the_job_completes(tmp_path: Path, fault_database_url: str) -> None:
    """A private `redis-server` on a free port (no persistence, like docker-compose.yml's: its queues,
    blobs, results and sequence guards are lost) is SIGKILLed after agent 0's first step and restarted on
    the same port; the job must still complete, each step applied once."""
    private = PrivateRedis(tmp_path)
    private.start()
    serve = ServeProcess(tmp_path / "data", fault_database_url, private.url, tmp_path)
    serve.start()
    workers = WorkerProcesses(private.url, serve.server_key_file, tmp_path)
    workers.start(0)
    stack = Stack(tmp_path, serve, workers)
    try:
        stack.enroll_agents([serve.base_url] * AGENTS)
        job_id = stack.start_job()
        stack.wait_for_position(0, job_id, 1, 1)
        private.kill()
        private.start()
        stack.wait_agents_done(timeout=90)  # it passes in 20-50 s; a stuck run must not take minutes
        assert_completed_cleanly(stack, job_id)
    finally:
        stack.close()
        private.stop()
