"""The README's "Production without Docker" block, run top to bottom as written: PostgreSQL, Redis, Celery
workers, an enrolled agent, a job that starts on its own and completes.

Only what a test machine needs differs, each swap checked to happen exactly where expected: a tiny model for
SmolLM2, a free port for 8443, and `flglm.env` with this test's database schema, Redis database and data
directory (the same variables as the README's file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from backend.db import drop_postgres_schema, fresh_postgres_schema
from tests.support.control_plane import free_port

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/4"  # a database of its own: the replica worker leases slots in it
SCHEMA = "flglm_readme_quickstart"
SECTION = "## Production without Docker"


def readme_blocks() -> tuple[str, str]:
    """The section's settings file and its quick-start script, as the README shows them."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    settings = re.search(r"```bash\n(.*?)```", section, re.S)
    script = re.search(
        r"<!-- quickstart:begin -->\n```bash\n(.*?)```\n<!-- quickstart:end -->", section, re.S
    )
    assert settings is not None and script is not None, "the README's quick-start blocks moved"
    return settings.group(1), script.group(1)


def swapped(script: str, old: str, new: str, count: int) -> str:
    assert script.count(old) == count, f"expected {old!r} {count} time(s) in the README's block"
    return script.replace(old, new)


def data_rows() -> str:
    """A small classification file in the agent's format, labels as the README's job names them."""
    words = ["harbour", "lantern", "walrus", "fjord", "cobalt", "quokka", "zeppelin", "obsidian"]
    rows = [
        {"text": f"{words[i % 8]} {words[(3 * i) % 8]} report number {i}", "label": ["BBC", "DW"][i % 2]}
        for i in range(24)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def quickstart_database(postgres_url: str, redis_url: str) -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield fresh_postgres_schema(postgres_url, SCHEMA)
    drop_postgres_schema(postgres_url, SCHEMA)
    client.flushdb()


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_the_readme_quick_start_runs_as_written(tmp_path: Path, quickstart_database: str) -> None:
    settings, script = readme_blocks()
    keys = [line.split("=", 1)[0] for line in settings.splitlines() if line.strip()]
    data_dir = tmp_path / "srv"
    ours = {
        "FLGLM_DATABASE_URL": quickstart_database,
        "FLGLM_EXECUTOR": "celery",
        "FLGLM_REDIS_URL": REDIS_URL,
        "FLGLM_DATA_DIR": str(data_dir),
        "FLGLM_CHECKPOINT_DIR": str(data_dir / "checkpoints"),
    }
    assert keys == list(ours), "the README's flglm.env names other settings than this test writes"
    (tmp_path / "flglm.env").write_text("".join(f"{k}='{v}'\n" for k, v in ours.items()), encoding="utf-8")
    (tmp_path / "hospital-a.jsonl").write_text(data_rows(), encoding="utf-8")
    port = free_port()
    script = swapped(script, "smollm2-135m", "tiny:llama:0", 1)
    script = swapped(script, "8443", str(port), 3)
    (tmp_path / "quickstart.sh").write_text(script, encoding="utf-8")

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `flglm` as installed
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "FLGLM_DEADLINE_CHECK_INTERVAL_S": "1",  # housekeeping, which starts the job, every second
    }
    for name in ("FLGLM_SERVER", "FLGLM_TOKEN", "FLGLM_CA_CERT", "FLGLM_AGENT_STATE"):
        env.pop(name, None)
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "quickstart.sh"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # serve and workers too: one group to stop whatever the outcome
    )
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    logs = {name: (tmp_path / name).read_text() for name in ("serve.log", "queues.log", "replica.log")}
    assert process.returncode == 0, output[-4000:] + "\n--- serve.log\n" + logs["serve.log"][-3000:]
    assert re.search(r"^job 1 'outlet-classifier': completed, round", output, re.M), output[-3000:]
    assert "executor celery (Redis redis://127.0.0.1:6379/4)" in logs["serve.log"]
    assert "database postgresql+psycopg://" in logs["serve.log"]
    assert "queues flglm.default, flglm.admission, flglm.privacy" in logs["queues.log"]
    assert "flglm worker: claimed replica slot 0" in logs["replica.log"]
