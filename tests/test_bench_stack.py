"""`flglm bench --json` on the tiny Llama: a real backend subprocess, client processes, one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from apps.bench.stack import MODES, StackBenchConfig, mode_figures


@pytest.mark.slow  # a backend subprocess and client processes train: half a minute or more on 2 cores
def test_full_stack_bench_runs_and_reports_ratios_and_wire_bytes() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    modes = "sequential,server_hierarchical_2"
    options = ["--json", "--model", "tiny:llama", "--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    completed = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "bench", *options, "--modes", modes],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert lines[0].startswith("| run |")  # the readable table comes first
    result = json.loads(lines[-1])
    assert result["bench"] == "stack" and result["executor"] == "inprocess"
    assert result["centralized"]["tokens_per_s"] > 0
    assert set(result["modes"]) == {"sequential", "server_hierarchical_2"}
    for name, figures in result["modes"].items():
        clients = MODES[name][1]
        assert figures["timed_steps_per_client"] == 2
        central = figures["centralized"]  # measured right before the mode, on its batches
        assert central["steps"] == clients * 2
        assert figures["tokens"] == central["tokens"] == clients * 2 * 2 * 16  # full rows, all real
        assert figures["ratio_to_centralized"] > 0
        assert figures["wire_bytes_per_token"] > 0
        assert figures["wire_over_raw"] >= 1  # envelopes, headers and the mask add bytes
        assert figures["wire_over_raw"] < 1.5  # and float32 tensors stay float32 on the wire
        assert len(figures["final_losses"]) == clients
    assert result["modes"]["sequential"]["target"] == 0.90


def test_mode_figures_aggregate_over_the_window_of_all_clients() -> None:
    def step(start: float, end: float) -> dict[str, float]:
        return {"start": start, "end": end, "loss": 1.0, "tokens": 8, "bytes_up": 10, "bytes_down": 6}

    reports = [
        {"steps": [{**step(0, 1), "rows": 1, "seq": 2}, {**step(1, 2), "rows": 1, "seq": 2}]},
        {"steps": [{**step(0.5, 1.5), "rows": 1, "seq": 2}, {**step(1.5, 4), "rows": 1, "seq": 2}]},
    ]
    figures = mode_figures("client_batch_2", reports, hidden=1)
    assert figures["seconds"] == 4  # first start 0 to last end 4
    assert figures["tokens_per_s"] == 32 / 4
    assert figures["wire_bytes_per_token"] == 64 / 32
    assert figures["raw_tensor_bytes"] == 4 * (4 * 1 * 2 * 1 * 4)


def test_unknown_mode_and_executor_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown mode.*'pipeline'"):
        StackBenchConfig(modes=("pipeline",))
    with pytest.raises(ValueError, match="executor must be"):
        StackBenchConfig(executor="ray")


def test_a_centralized_device_the_machine_lacks_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="cpu or cuda"):
        StackBenchConfig(model="tiny:llama", centralized_device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            StackBenchConfig(model="tiny:llama", centralized_device="cuda")
