"""The federated half of the demo: a real control plane and three real agent processes talking HTTPS.

`FederatedDemo` starts `flglm serve --self-signed` (SQLite, in-process executor) on a free port with a fresh
data directory and a generated admin token, enrolls one `flglm agent` per client file (each with its own state
directory), submits, opens and starts the job, lets every agent approve it and run `--stop-when-done`, and
follows the job through the operator API with a progress bar. Afterwards it reads the per-step metrics
(losses and bytes on the wire) and the export bundle (`GET /jobs/{id}/export`) the evaluation uses.

Threads: the server's body does most of the arithmetic while the agents wait for it (client_batch), so the
server gets `server_threads` and every agent one thread.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from flglm.protocol import JobStatus

FLGLM_CLI = [sys.executable, "-m", "apps.cli.main"]
TERMINAL = {JobStatus.completed.value, JobStatus.failed.value, JobStatus.cancelled.value}


class DemoFailure(RuntimeError):
    """The federated run could not finish; the message names the step and the log to read."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


@dataclass
class StepLoss:
    client: str
    round_number: int
    step: int
    loss: float


@dataclass
class FederatedOutcome:
    """What the operator API tells about the finished job."""

    job_id: int
    status: str
    wall_s: float
    step_losses: list[StepLoss]
    round_train_loss: dict[int, float]  # round -> mean of the clients' step losses
    wire_bytes_up: int
    wire_bytes_down: int
    export_bundle: bytes
    client_names: list[str] = field(default_factory=list)


class FederatedDemo:
    """Control plane + agents as subprocesses under `work_dir`; a context manager that stops them all."""

    def __init__(self, work_dir: Path, server_threads: int = 2, log: Callable[[str], None] = print) -> None:
        self.work_dir = work_dir
        self.server_threads = server_threads
        self.log = log
        self.port = free_port()
        self.base_url = f"https://localhost:{self.port}"
        self.admin_token = "flglm_at_demo-" + secrets.token_urlsafe(24)
        self.server_dir = work_dir / "server"
        self.ca_cert = self.server_dir / "tls" / "ca.pem"
        self._server: subprocess.Popen[bytes] | None = None
        self._agents: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._http: httpx.Client | None = None

    # ---- processes ------------------------------------------------------------------------------------

    def _env(self, threads: int, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            **extra,
        }

    def start_server(self, timeout_s: float = 90.0) -> None:
        self.server_dir.mkdir(parents=True, exist_ok=True)
        env = self._env(
            self.server_threads,
            FLGLM_DATA_DIR=str(self.server_dir),
            FLGLM_DATABASE_URL="",
            FLGLM_EXECUTOR="inprocess",
            FLGLM_BOOTSTRAP_ADMIN_TOKEN=self.admin_token,
            FLGLM_DEADLINE_CHECK_INTERVAL_S="2",
        )
        log_path = self.work_dir / "server.log"
        with log_path.open("ab") as log:
            self._server = subprocess.Popen(
                [
                    *FLGLM_CLI,
                    "serve",
                    "--self-signed",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.server_dir),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._server.poll() is not None:
                raise DemoFailure(
                    f"the control plane exited with {self._server.returncode}:\n{_tail(log_path)}"
                )
            if self.ca_cert.exists():
                try:
                    with httpx.Client(verify=str(self.ca_cert), timeout=2) as probe:
                        if probe.get(f"{self.base_url}/api/v1/health").status_code == 200:
                            break
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise DemoFailure(
                    f"the control plane did not answer within {timeout_s:.0f} s:\n{_tail(log_path)}"
                )
            time.sleep(0.3)
        self._http = httpx.Client(
            base_url=f"{self.base_url}/api/v1",
            verify=str(self.ca_cert),
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=60,
        )

    def api(self, method: str, path: str, expected: int = 200, **kwargs: Any) -> Any:
        assert self._http is not None, "start_server() first"
        response = self._http.request(method, path, **kwargs)
        if response.status_code != expected:
            raise DemoFailure(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
        return response.json() if "json" in response.headers.get("content-type", "") else response.content

    def _agent_cli(self, name: str, *args: str) -> None:
        state = self.work_dir / "agents" / name
        done = subprocess.run(
            [*FLGLM_CLI, "agent", *args],
            env=self._env(1, FLGLM_AGENT_STATE=str(state)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise DemoFailure(
                f"`flglm agent {args[0]}` for {name} failed ({done.returncode}): {done.stderr[-1500:]}"
            )

    def enroll_agent(self, name: str) -> None:
        token = self.api("POST", "/clients/enrollment-tokens", 201, json={"name": name})["token"]
        self._agent_cli(
            name,
            "enroll",
            "--server",
            self.base_url,
            "--token",
            token,
            "--ca-cert",
            str(self.ca_cert),
            "--name",
            name,
        )

    def start_agent(self, name: str, data: Path) -> None:
        state = self.work_dir / "agents" / name
        log_path = self.work_dir / f"agent-{name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    *FLGLM_CLI,
                    "agent",
                    "run",
                    "--data",
                    str(data),
                    "--quiet",
                    "--poll-s",
                    "0.3",
                    "--stop-when-done",
                ],
                env=self._env(1, FLGLM_AGENT_STATE=str(state)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._agents.append((process, log_path))

    # ---- the job --------------------------------------------------------------------------------------

    def run_job(
        self,
        spec: dict[str, Any],
        client_files: dict[str, Path],
        on_progress: Callable[[int, int, float | None], None] | None = None,
        timeout_s: float = 3600.0,
    ) -> FederatedOutcome:
        """Enroll, submit, approve, start and follow one job to its end; `on_progress(done, total, loss)`."""
        names = list(client_files)
        for name in names:
            self.enroll_agent(name)
        job_id = int(self.api("POST", "/jobs", 201, json={**spec, "clients": names})["id"])
        self.api("POST", f"/jobs/{job_id}/open")
        for name in names:
            self._agent_cli(name, "approve", str(job_id))
        started = time.monotonic()
        for name, data in client_files.items():
            self.start_agent(name, data)
        deadline = started + timeout_s
        # The job starts by itself (`start: auto`) once its agents are online; starting it here is quicker.
        while self._http is not None and self._http.post(f"/jobs/{job_id}/start").status_code != 200:
            if self.api("GET", f"/jobs/{job_id}")["status"] != "waiting_for_clients":
                break
            self._check_agents()
            if time.monotonic() > deadline:
                raise DemoFailure("the job never started (the agents did not come online)")
            time.sleep(0.5)
        total = spec["rounds"] * spec["steps_per_round"] * len(names)
        status = ""
        while status not in TERMINAL:
            progress = self.api("GET", f"/metrics/jobs/{job_id}/progress")
            status = progress["status"]
            losses = [c["last_loss"] for c in progress["clients"] if c["last_loss"] is not None]
            if on_progress is not None:
                on_progress(progress["steps_reported"], total, sum(losses) / len(losses) if losses else None)
            if status in TERMINAL:
                break
            self._check_agents()
            if time.monotonic() > deadline:
                raise DemoFailure(f"job {job_id} did not finish within {timeout_s:.0f} s")
            time.sleep(1.0)
        wall_s = time.monotonic() - started
        for agent, _ in self._agents:
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.terminate()
        if status != JobStatus.completed.value:
            raise DemoFailure(f"job {job_id} ended {status}; logs in {self.work_dir}")
        return self._outcome(job_id, status, wall_s, names)

    def _check_agents(self) -> None:
        for agent, log in self._agents:
            if agent.poll() not in (None, 0):
                raise DemoFailure(f"an agent exited with {agent.returncode}:\n{_tail(log)}")

    def _outcome(self, job_id: int, status: str, wall_s: float, names: list[str]) -> FederatedOutcome:
        progress = self.api("GET", f"/metrics/jobs/{job_id}/progress")
        name_of = {c["client_id"]: c["client_name"] for c in progress["clients"]}
        metrics: list[dict[str, Any]] = []
        while True:
            page = self.api(
                "GET", "/metrics", params={"job_id": job_id, "limit": 500, "offset": len(metrics)}
            )
            metrics += page["items"]
            if len(metrics) >= page["total"] or not page["items"]:
                break
        steps = sorted(
            (
                StepLoss(name_of[m["client_id"]], m["round_number"], m["step"], float(m["loss"]))
                for m in metrics
            ),
            key=lambda s: (s.round_number, s.step, s.client),
        )
        by_round: dict[int, list[float]] = {}
        for s in steps:
            by_round.setdefault(s.round_number, []).append(s.loss)
        return FederatedOutcome(
            job_id=job_id,
            status=status,
            wall_s=wall_s,
            step_losses=steps,
            round_train_loss={r: sum(v) / len(v) for r, v in by_round.items()},
            wire_bytes_up=int(progress["wire_bytes_up"]),
            wire_bytes_down=int(progress["wire_bytes_down"]),
            export_bundle=self.api("GET", f"/jobs/{job_id}/export"),
            client_names=names,
        )

    # ---- teardown -------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        for process in [*(agent for agent, _ in self._agents), self._server]:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()

    def __enter__(self) -> FederatedDemo:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
