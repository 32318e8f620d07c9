"""`flglm serve` and `flglm worker` say at start which executor, database, Redis and directories they use,
with passwords hidden."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from apps.cli.banner import redact_url
from tests.support.control_plane import free_port


def first_line_with(args: list[str], marker: str, env: dict[str, str], timeout_s: float = 60) -> str:
    """Start `flglm ARGS`, return its first stderr line containing `marker`, stop it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "apps.cli.main", *args],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if marker in line:
                return line.strip()
            assert time.monotonic() < deadline, f"no {marker!r} line"
        raise AssertionError(f"exited with {process.wait()} before printing {marker!r}")
    finally:
        process.kill()
        process.wait(timeout=20)


def test_redact_url_hides_passwords_only() -> None:
    assert (
        redact_url("postgresql+psycopg://flglm:s3cret@db:5432/flglm")
        == "postgresql+psycopg://flglm:***@db:5432/flglm"
    )
    assert redact_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("sqlite:////data/flglm.db") == "sqlite:////data/flglm.db"


def test_serve_prints_its_executor_database_and_dirs(tmp_path: Path) -> None:
    port = free_port()
    line = first_line_with(
        ["serve", "--self-signed", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--executor", "celery", "--redis-url", "redis://:s3cret@127.0.0.1:6379/5"],
        "flglm serve:",
        {"FLGLM_BOOTSTRAP_ADMIN_TOKEN": "flglm_at_banner-test"},
    )  # fmt: skip
    assert (
        f"https://127.0.0.1:{port}" in line
        and "executor celery (Redis redis://:***@127.0.0.1:6379/5)" in line
    )
    assert f"database sqlite:///{tmp_path / 'data' / 'flglm.db'}" in line and "s3cret" not in line
    assert (
        f"data dir {tmp_path / 'data'}" in line and f"checkpoints {tmp_path / 'data' / 'checkpoints'}" in line
    )


def test_serve_refuses_an_unknown_executor(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "serve", "--executor", "slurm", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "--executor" in result.stderr and "inprocess or celery" in result.stderr


def test_worker_prints_its_redis_queues_and_device(tmp_path: Path) -> None:
    line = first_line_with(
        ["worker", "--replica", "none", "--no-privacy-queue"],
        "flglm worker: Redis",
        {"FLGLM_REDIS_URL": "redis://:s3cret@127.0.0.1:6379/5", "FLGLM_DATA_DIR": str(tmp_path),
         "FLGLM_WORKER_DEVICE": "cpu"},
    )  # fmt: skip
    assert "Redis redis://:***@127.0.0.1:6379/5" in line and "s3cret" not in line
    assert "queues flglm.default, flglm.admission;" in line and "device cpu" in line
    assert f"server key {tmp_path / 'server_x25519.key'}" in line
