"""`flglm agent ...` as real subprocesses, each with its own state directory, data file and log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flglm import protocol
from tests.support.control_plane import Api, LiveServer, enrollment_token

AGENT_CLI = [sys.executable, "-m", "apps.cli.main", "agent"]


def agent_env(state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLGLM_AGENT_STATE": str(state_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # three agents and a server share two cores
    }


@dataclass
class AgentProcess:
    name: str
    state_dir: Path
    data: Path
    log: Path

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AGENT_CLI, *args],
            env=agent_env(self.state_dir),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_run(self, *extra: str) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            return subprocess.Popen(
                [*AGENT_CLI, "run", "--data", str(self.data), "--quiet", "--poll-s", "0.3", *extra],
                env=agent_env(self.state_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def job_dir(self, job_id: int) -> Path:
        return self.state_dir / "jobs" / str(job_id)

    def position(self, job_id: int) -> dict[str, object] | None:
        path = self.job_dir(job_id) / "position.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            return None


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# The job the agent tests train: a tiny model, two labels, rows of made-up words per owner.
MODEL_REF = "tiny:llama:0"
LABELS = ["marmalade", "tangerine"]
WORDS = ["quokka", "zeppelin", "harbour", "obsidian", "lantern", "walrus", "fjord", "cobalt"]


def owner_rows(owner: int) -> list[dict[str, str]]:
    return [
        {
            "text": f"{WORDS[i % 8]} {WORDS[(i + owner) % 8]} secret{owner}x{i}",
            "label": LABELS[(i + owner) % 2],
        }
        for i in range(8)
    ]


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy (returned); fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def make_agent_process(
    tmp_path: Path, api: Api, ca_cert: Path, name: str, index: int, server_url: str
) -> AgentProcess:
    """`flglm agent enroll` (through `server_url`, e.g. a proxy) with `owner_rows(index)` as its data."""
    agent = AgentProcess(
        name,
        tmp_path / f"state-{name}",
        write_jsonl(tmp_path / f"{name}.jsonl", owner_rows(index)),
        tmp_path / f"{name}.log",
    )
    done = agent.cli(
        "enroll", "--server", server_url, "--token", enrollment_token(api, name),
        "--ca-cert", str(ca_cert), "--name", name,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return agent


def make_agent(
    tmp_path: Path, api: Api, live: LiveServer, name: str, index: int, server_url: str
) -> AgentProcess:
    """`make_agent_process` against a live server; the agent's state files must be private."""
    agent = make_agent_process(tmp_path, api, live.tls.ca_cert, name, index, server_url)
    assert (agent.state_dir / "credential.json").stat().st_mode & 0o777 == 0o600
    assert (agent.state_dir / "client_key.pem").stat().st_mode & 0o777 == 0o600
    return agent


def agent_job_view(labels: list[str], **hyperparameters: object) -> protocol.AgentJobView:
    """What an agent is told of a one-round tiny-Llama classification job (its code run in-process)."""
    return protocol.AgentJobView(
        job_id=1, name="j", model_ref="tiny:llama:0", task_type=protocol.TaskType.classification,
        parallel_mode=protocol.ParallelMode.sequential, rounds=1, steps_per_round=1,
        hyperparameters={"labels": labels, "max_seq_len": 16, **hyperparameters}, privacy={},
        job_status=protocol.JobStatus.running,
        consent=protocol.ConsentStatus.approved, split_plan={}, adapter={}, current_round=1,
        server_public_key="",
    )  # fmt: skip
