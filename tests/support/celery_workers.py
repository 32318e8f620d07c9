"""`flglm worker` (Celery) processes on real Redis: their queues, slot leases and the CLI starting them."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from worker.slots import slot_key

REPO = Path(__file__).resolve().parents[2]


def clear_worker_queues(redis_url: str) -> str:
    """The workers' Redis URL (database 14, theirs alone), emptied: an interrupted or earlier run leaves
    queues and 30-day job specs there, and a stale spec of the same job id carries other client keys."""
    url = redis_url.rsplit("/", 1)[0] + "/14"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="module")
def worker_redis_url(redis_url: str) -> str:
    return clear_worker_queues(redis_url)


def clear_slot_leases(client: redis.Redis) -> None:
    for key in client.scan_iter(match=slot_key(0)[:-1] + "*"):
        client.delete(key)


def run_flglm(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`flglm ARGS` in a subprocess against the given Redis."""
    env = dict(os.environ, FLGLM_REDIS_URL=redis_url, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "apps.cli.main", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


class WorkerProcesses:
    """Starts `flglm worker` subprocesses (Celery, solo pool) and kills them like an operator would not."""

    def __init__(self, redis_url: str, key_file: Path, log_dir: Path) -> None:
        self.redis_url, self.key_file, self.log_dir = redis_url, key_file, log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.run_id = random.randrange(10**9)

    def log_path(self, index: int) -> Path:
        return self.log_dir / f"worker-{index}.log"

    def node_name(self, index: int) -> str:
        return f"test-{index}-{self.run_id}@{socket.gethostname()}"

    def start(
        self, *replicas: int | str, options: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`flglm worker --replica R ...` (R a slot or 'auto') with `options`, node name `node_name(i)`."""
        worker_env = dict(os.environ)
        worker_env.update(
            FLGLM_REDIS_URL=self.redis_url,
            FLGLM_SERVER_KEY_FILE=str(self.key_file),
            FLGLM_BROKER_VISIBILITY_TIMEOUT_S="5",  # redeliver a dead worker's task quickly
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
            **(env or {}),
        )
        args = [
            sys.executable,
            "-m",
            "apps.cli.main",
            "worker",
            "--loglevel",
            "warning",
            "--hostname",
            self.node_name(len(self.processes)),
            *options,
        ]
        for replica in replicas:
            args += ["--replica", str(replica)]
        if replicas and replicas[0] not in (0, "auto", "none"):
            args.append("--no-default-queue")
        log = open(self.log_path(len(self.processes)), "wb")  # noqa: SIM115
        process = subprocess.Popen(args, env=worker_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
