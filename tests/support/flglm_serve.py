"""`flglm serve --self-signed` as a real process on SQLite: the `served` fixture and its admin token."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.control_plane import free_port

ADMIN = "flglm_at_cli-test-admin"


@pytest.fixture
def served_env() -> dict[str, str]:
    """Settings for the `served` process; a test overrides it with `@pytest.mark.parametrize`."""
    return {}


@pytest.fixture
def served(tmp_path: Path, served_env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """A `flglm serve --self-signed` process on SQLite; yields (base URL, CA certificate)."""
    port = free_port()
    env = {
        **os.environ,
        "FLGLM_BOOTSTRAP_ADMIN_TOKEN": ADMIN,
        "FLGLM_DEADLINE_CHECK_INTERVAL_S": "1",
        **served_env,
    }
    cmd = [sys.executable, "-m", "apps.cli.main", "serve", "--self-signed", "--port", str(port)]
    process = subprocess.Popen(
        [*cmd, "--data-dir", str(tmp_path / "data")],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    ca_cert = tmp_path / "data" / "tls" / "ca.pem"
    base_url = f"https://localhost:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "flglm serve did not come up"
            if ca_cert.exists():
                try:
                    if (
                        httpx.get(f"{base_url}/api/v1/health", verify=str(ca_cert), timeout=2).status_code
                        == 200
                    ):
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        yield base_url, ca_cert
    finally:
        process.terminate()
        process.wait(timeout=20)
        stderr = process.stderr.read().decode() if process.stderr else ""
        assert f"--ca-cert {ca_cert}" in stderr  # the CA path is printed for agents and the CLI
