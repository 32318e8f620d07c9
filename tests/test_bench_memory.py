"""`flglm bench memory`, small: a real job through serve + worker + agents, every process's memory per phase,
its figures checked against an independent reading (the sampler's, from outside the process)."""

from __future__ import annotations

from pathlib import Path

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
