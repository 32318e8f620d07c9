"""`flglm bench load --json`, small: one backend on PostgreSQL + Celery, every route exercised."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from apps.bench.load import IDLE_WORK, RESULT, ROUTES, load_table, percentile


def test_small_load_bench_exercises_every_route_without_errors(postgres_url: str, redis_url: str) -> None:
    # redis_url: Redis must be up (the bench uses a database of its own on the same server).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    options = ["--json", "--agents", "5", "--idle-agents", "2", "--seconds", "6", "--wait-s", "2",
               "--heartbeat-s", "2", "--work-wait-s", "2", "--poll-s", "0.5"]  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "bench", "load", *options, "--database-url", postgres_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "requests" in completed.stderr  # progress goes to stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["bench"] == "load" and result["agents"] == 5
    assert result["errors"] == 0, {n: r["error_samples"] for n, r in result["routes"].items()}
    assert set(result["routes"]) == set(ROUTES)
    for name, route in result["routes"].items():
        assert route["requests"] > 0, name
        assert route["errors"] == 0, (name, route["error_samples"])
        assert 0 < route["p50_ms"] <= route["p99_ms"] <= route["max_ms"], name
        assert route["kind"] == ROUTES[name][0]
    long_polls = result["routes"][RESULT]["requests"] + result["routes"][IDLE_WORK]["requests"]
    assert long_polls == result["long_polls"] and result["routes"][RESULT]["requests"] >= 5  # every agent
    assert set(result["routes"][RESULT]["statuses"]) == {"204"}  # the batch waits for the holdout
    # Participants asked for their work once (it answered at once); idle agents' work requests waited.
    assert result["routes"]["GET /agent/work"]["requests"] == 5 and result["idle_agents"] == 2
    idle_work = result["routes"][IDLE_WORK]
    assert idle_work["requests"] >= 2 and idle_work["overshoot_p50_ms"] > -500  # held for its wait_s
    assert result["requests"] == sum(r["requests"] for r in result["routes"].values())
    assert result["backend_peak_rss_bytes"] > 10 * 2**20
    assert result["targets"] == {"agents": 200, "p99_ms_non_waiting": 50.0, "errors": 0}
    assert set(result["meets_targets"]) == {"agents", "p99_ms_non_waiting", "errors"}
    table = load_table(result)
    assert "peak RSS" in table and "p99 < 50 ms" in table


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
