"""A training agent's resident memory stays flat: 300 tiny-model steps, 3 rounds with local evaluation, read
from its own `--memory-log` (which this also checks: every phase is logged, in order)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.agent_processes import LABELS, MODEL_REF, make_agent, wait_until
from tests.support.control_plane import Api, LiveServer, job_spec

ROUNDS, STEPS = 3, 100
MIB = 2**20
# Generous on purpose (the benchmark, `flglm bench memory`, checks the real targets): a leak of a few
# hundred bytes per step, or a step's graph or an eval batch kept per step or round, goes far past it.
MAX_GROWTH_BYTES = 24 * MIB


def test_an_agents_memory_is_flat_over_hundreds_of_steps(
    tmp_path: Path, live_server: LiveServer, api: Api
) -> None:
    agent = make_agent(tmp_path, api, live_server, "steady-owner", 0, live_server.base_url)
    spec = job_spec(
        [agent.name],
        name="memory-flat",
        model_ref=MODEL_REF,
        task_type="classification",
        adapter={"r": 4, "alpha": 8},
        hyperparameters={"lr": 1e-3, "batch_size": 4, "labels": LABELS, "max_seq_len": 32,
                         "eval_fraction": 0.25, "eval_examples": 2},
        parallel_mode="sequential",
        rounds=ROUNDS,
        steps_per_round=STEPS,
        min_clients=1,
    )  # fmt: skip
    job_id = api.ok("POST", "/jobs", 201, json=spec)["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    assert agent.cli("approve", str(job_id)).returncode == 0
    memory_log = tmp_path / "memory.jsonl"
    run = agent.start_run("--stop-when-done", "--memory-log", str(memory_log))
    try:
        wait_until(lambda: api.post(f"/jobs/{job_id}/start").status_code == 200, 120, "the job to start")
        assert run.wait(timeout=600) == 0, agent.log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    events = [json.loads(line) for line in memory_log.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["started", "loaded"], kinds[:5]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["global_step"] for e in steps] == list(range(ROUNDS * STEPS))
    assert kinds.count("eval_start") == kinds.count("eval_end") == ROUNDS
    assert kinds[-1] == "job_closed"  # the finished job's parts were released before the agent stopped
    assert all(0 < e["rss"] <= e["peak"] for e in events)
    warm = steps[STEPS // 2]["rss"]  # after warm-up: allocator pools, lazily imported modules
    growth = max(e["rss"] for e in steps[STEPS // 2 :]) - warm
    assert growth <= MAX_GROWTH_BYTES, f"grew {growth / MIB:.1f} MiB over {len(steps) - STEPS // 2} steps"
