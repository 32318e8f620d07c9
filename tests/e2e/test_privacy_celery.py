"""A privacy audit on a real Celery worker process: a plain `flglm worker` consumes the flglm.privacy queue,
the audit's records cross Redis, and the backend reads the report back over HTTPS.

Redis database 9 is this module's own, emptied first (its queue must not meet another test's workers).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from backend.settings import Settings
from tests.support.celery_workers import WorkerProcesses
from tests.support.control_plane import Api, LiveServer, job_spec

pytestmark = pytest.mark.slow

TEXTS = [
    "The river rose overnight and the town council met at dawn to plan the evacuation of the low streets.",
    "A small bakery on the corner sells rye bread, honey cakes and strong coffee to the early commuters.",
]
WAIT_S = 300.0


@pytest.fixture
def settings_overrides(redis_url: str) -> dict[str, Any]:
    url = redis_url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return {"executor": "celery", "redis_url": url}


@pytest.fixture
def workers(settings: Settings, tmp_path: Path, live_server: LiveServer) -> Iterator[WorkerProcesses]:
    """One `flglm worker --replica 0` with its default queues, as docker-compose runs it."""
    processes = WorkerProcesses(settings.redis_url, settings.resolved_server_key_file(), tmp_path)
    processes.start(0)
    yield processes
    processes.stop_all()


def test_a_default_worker_runs_the_audit_and_the_backend_reads_its_report(
    api: Api, workers: WorkerProcesses
) -> None:
    job_id = api.ok("POST", "/jobs", 201, json=job_spec([], model_ref="tiny:llama"))["id"]
    body = {"sequences": 4, "seq_len": 8, "texts": TEXTS, "attacks": ["known_weights_inversion"]}
    audit_id = api.ok("POST", f"/jobs/{job_id}/privacy-audits", 202, json=body)["id"]
    deadline = time.monotonic() + WAIT_S
    while True:
        audit = api.ok("GET", f"/jobs/{job_id}/privacy-audits/{audit_id}")
        if audit["status"] in ("completed", "failed"):
            break
        assert workers.processes[0].poll() is None, workers.log_path(0).read_text()[-3000:]
        assert time.monotonic() < deadline, (audit, workers.log_path(0).read_text()[-3000:])
        time.sleep(0.3)
    assert audit["status"] == "completed", audit["error"]
    assert audit["started_at"] is not None and audit["result"]["text_source"] == "2 given texts"
    [attack] = audit["result"]["attacks"]
    assert attack["attack"] == "known_weights_inversion" and attack["tokens"] == 32
