"""Test helpers: `flglm agent ...` as real subprocesses, each with its own state directory and log file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
