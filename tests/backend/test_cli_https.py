"""The CLI against a real `flglm serve --self-signed` process: certificate failures say so at once and point
at `--ca-cert`, a bogus enrollment token gives one clear message, no HTTP client log lines by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from apps.cli.main import app
from tests.support.flglm_serve import ADMIN

FLGLM = [sys.executable, "-m", "apps.cli.main"]


def _flglm(*args: str, state_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FLGLM_AGENT_STATE": str(state_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for name in ("FLGLM_CA_CERT", "FLGLM_SERVER", "FLGLM_TOKEN", "SSL_CERT_FILE"):
        env.pop(name, None)
    return subprocess.run([*FLGLM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _enrollment_token(base_url: str, ca_cert: Path, name: str) -> str:
    env = {"FLGLM_SERVER": base_url, "FLGLM_TOKEN": ADMIN, "FLGLM_CA_CERT": str(ca_cert)}
    result = CliRunner().invoke(app, ["client", "enroll-token", name], env=env)
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["token"])


def test_certificate_failure_is_named_at_once_and_points_at_ca_cert(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    base_url, ca_cert = served
    token = _enrollment_token(base_url, ca_cert, "lab-1")
    started = time.monotonic()
    enroll = _flglm("agent", "enroll", "--server", base_url, "--token", token, state_dir=tmp_path / "a")
    assert time.monotonic() - started < 20  # no 7 retries with backoff
    assert enroll.returncode == 2, enroll.stderr
    assert "certificate" in enroll.stderr and "--ca-cert" in enroll.stderr
    assert "unreachable" not in enroll.stderr and enroll.stderr.count("error:") == 1

    listed = _flglm("job", "list", "--server", base_url, "--token", ADMIN, state_dir=tmp_path / "a")
    assert listed.returncode == 1
    assert (
        "certificate" in listed.stderr and "--ca-cert" in listed.stderr and "Traceback" not in listed.stderr
    )

    # With the CA, the same token still works: the refused attempt did not use it.
    state = tmp_path / "b"
    enroll = _flglm(
        "agent", "enroll", "--server", base_url, "--token", token, "--ca-cert", str(ca_cert), state_dir=state
    )
    assert enroll.returncode == 0, enroll.stderr


def test_bogus_enrollment_token_gives_one_clear_message(served: tuple[str, Path], tmp_path: Path) -> None:
    base_url, ca_cert = served
    enroll = _flglm(
        "agent",
        "enroll",
        "--server",
        base_url,
        "--token",
        "flglm_et_bogus",
        "--ca-cert",
        str(ca_cert),
        state_dir=tmp_path / "a",
    )
    assert enroll.returncode != 0
    lines = enroll.stderr.strip().splitlines()
    assert len(lines) == 1, enroll.stderr
    assert "enrollment token" in lines[0] and "flglm client enroll-token" in lines[0]
    assert "credential" not in lines[0]  # not the revoked-credential advice of a running agent


def test_no_http_client_log_lines_by_default(served: tuple[str, Path], tmp_path: Path) -> None:
    base_url, ca_cert = served
    state = tmp_path / "agent"
    token = _enrollment_token(base_url, ca_cert, "lab-2")
    enroll = _flglm(
        "agent", "enroll", "--server", base_url, "--token", token, "--ca-cert", str(ca_cert), state_dir=state
    )
    assert enroll.returncode == 0, enroll.stderr
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello", "label": "a"}\n{"text": "bye", "label": "b"}\n')
    env = {**os.environ, "FLGLM_AGENT_STATE": str(state), "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen(
        [*FLGLM, "agent", "run", "--data", str(data), "--poll-s", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(15)  # torch loads, then it polls every 0.2 s
        assert run.poll() is None, "the agent exited"
    finally:
        run.terminate()
        _, stderr = run.communicate(timeout=30)
    status = _flglm("agent", "status", state_dir=state)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "active"
    for output in (stderr, status.stderr, enroll.stderr):
        assert "HTTP Request" not in output and "httpx" not in output, output
