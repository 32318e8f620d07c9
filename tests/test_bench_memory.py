"""`flglm bench memory`, small: a real job through serve + worker + agents, every process's memory per phase,
its figures checked against an independent reading (the sampler's, from outside the process)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apps.bench.memory import MemoryBenchConfig, memory_table, run_memory_bench, slope_per_100
from apps.bench.memory_plot import plot_memory

MIB = 2**20


def test_slope_is_per_100_steps_and_needs_three_points() -> None:
    assert slope_per_100([(0, 0.0), (10, 5.0), (20, 10.0)]) == pytest.approx(50.0)
    assert slope_per_100([(0, 1.0), (1, 1.0)]) is None


@pytest.mark.slow
def test_small_memory_bench_reports_every_process_and_phase(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    # redis_url: Redis must be up (the bench uses database 9 of the same server).
    config = MemoryBenchConfig(
        model_ref="tiny:llama", agents=2, rounds=2, steps_per_round=6, batch_size=4, max_seq_len=32,
        eval_examples=4, timeout_s=300, database_url=postgres_url,
    )  # fmt: skip
    result = run_memory_bench(config, None, lambda _: None)  # a temporary work dir, as `flglm bench memory`
    assert result["job"]["status"] == "completed", result["job"]
    for name in ("agent-0", "agent-1"):
        agent = result["processes"][name]
        assert agent["steps"] == 12 and agent["evaluations"] == 2, agent
        assert 50 * MIB < agent["after_import_bytes"] <= agent["after_loading_bytes"] <= agent["peak_bytes"]
        assert agent["peak_training_bytes"] <= agent["peak_bytes"]
        assert agent["peak_evaluation_bytes"] is not None
        # The agent's own VmHWM against the sampler's reading from outside: never below it, and close.
        sampled = max(rss for _, rss in result["samples"][name])
        assert sampled <= agent["peak_bytes"] * 1.01 and sampled >= agent["peak_bytes"] * 0.85, (
            sampled,
            agent,
        )
    worker = result["processes"]["worker"]
    assert worker["peak_bytes"] >= worker["peak_sampled_bytes"] * 0.99 > 0
    terms = result["replica"]["terms"]
    assert terms["body_weights_bytes"] > 0 and terms["graph_per_step_bytes"] > 0
    assert terms["adapters_grads_adamw_bytes"] > 0
    assert result["whole_model_client"]["peak_bytes"] > 50 * MIB
    table = memory_table(result)
    assert "agent-0" in table and "replica (worker)" in table and "whole-model client" in table
    plot_memory(result, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bench_memory_cli(*options: str) -> dict[str, Any]:
    """`flglm bench memory --json OPTIONS` as a subprocess; its JSON result."""
    completed = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "bench", "memory", "--json", *options],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_the_command_applies_every_option(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    """Each option of `flglm bench memory` reaches the run: the job's shape, the executor (no worker
    process with the body embedded in `flglm serve`), the sampling interval, the work dir and the plot."""
    result = bench_memory_cli(
        "--model", "tiny:llama", "--agents", "1", "--rounds", "1", "--steps-per-round", "5",
        "--batch-size", "2", "--max-seq-len", "24", "--eval-examples", "3", "--executor", "inprocess",
        "--sample-s", "0.05", "--timeout-s", "300", "--database-url", postgres_url,
        "--work-dir", str(tmp_path / "work"), "--plot", str(tmp_path / "memory.png"),
    )  # fmt: skip
    assert result["job"]["status"] == "completed"
    config = result["config"]
    assert (config["model_ref"], config["agents"], config["rounds"], config["steps_per_round"]) == (
        "tiny:llama", 1, 1, 5,
    )  # fmt: skip
    assert (config["batch_size"], config["max_seq_len"], config["eval_examples"]) == (2, 24, 3)
    assert config["executor"] == "inprocess" and config["sample_s"] == 0.05 and config["timeout_s"] == 300
    assert set(result["processes"]) == {"agent-0", "backend"} and result["replica"]["process"] == "backend"
    assert result["processes"]["agent-0"]["steps"] == 5
    samples = [t for t, _ in result["samples"]["backend"]]
    gaps = sorted(b - a for a, b in itertools.pairwise(samples))
    assert len(samples) > 20 and gaps[len(gaps) // 2] < 0.15  # sampled every 0.05 s, not the default 0.2
    assert (tmp_path / "work" / "agent-0.memory.jsonl").is_file()  # --work-dir kept the logs
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
