"""Split generation with the body on a real Celery worker process on real Redis, over HTTPS.

The backend uses the Celery executor (Redis blobs, tasks by name on the broker); one `flglm worker` serves
replica queue 0, where the generation sessions live. Redis database 10 is this module's own, emptied first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from backend.settings import Settings
from flglm.generation import encode_body_input
from tests.support.celery_workers import WorkerProcesses
from tests.support.control_plane import Api, LiveServer
from tests.support.generation_jobs import (
    HIDDEN,
    NEW_TOKENS,
    PROMPTS,
    body_call,
    generate_through_sessions,
    trained_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def settings_overrides(redis_url: str) -> dict[str, Any]:
    url = redis_url.rsplit("/", 1)[0] + "/10"
    client = redis.Redis.from_url(url)
    client.flushdb()  # this module's own database: queues, blobs and results of earlier runs
    client.close()
    return {"executor": "celery", "redis_url": url, "generation_task_timeout_s": 60.0}


@pytest.fixture
def workers(settings: Settings, tmp_path: Path, live_server: LiveServer) -> Iterator[WorkerProcesses]:
    """One `flglm worker` on replica queue 0, sharing the backend's server key (the app created it)."""
    processes = WorkerProcesses(settings.redis_url, settings.resolved_server_key_file(), tmp_path)
    processes.start(0)
    yield processes
    processes.stop_all()


def test_generation_with_the_body_on_a_celery_worker_equals_the_unsplit_model(
    live_server: LiveServer, api: Api, settings: Settings, workers: WorkerProcesses
) -> None:
    job_id, reference = trained_job(api, settings)
    answer = api.ok(
        "POST", f"/jobs/{job_id}/generate", json={"prompts": PROMPTS, "max_new_tokens": NEW_TOKENS}
    )
    assert answer["completions"] == reference.completions
    assert torch.equal(generate_through_sessions(live_server, api, job_id, reference), reference.sequences)
    # The session's cache lives in the worker process: after that process dies, the session is unknown.
    session_id = api.ok("POST", f"/jobs/{job_id}/generate/sessions", 201)["session_id"]
    hidden, mask = torch.randn(1, 3, HIDDEN), torch.ones(1, 3, dtype=torch.long)  # (batch, seq, hidden)
    assert body_call(api, job_id, session_id, encode_body_input(hidden, mask)) == 200
    workers.kill(workers.processes[0])
    workers.start(0)
    follow_up = encode_body_input(hidden[:, :1], torch.ones(1, 4, dtype=torch.long))
    assert body_call(api, job_id, session_id, follow_up) == 404
