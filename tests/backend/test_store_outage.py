"""Redis (the blob store and the task broker) unreachable, or restarted without persistence: the step routes
answer 503 with `Retry-After` (the agents' StepClient retries 5xx with backoff), never 500; a running job
whose worker spec Redis lost answers 503 `job_not_published` until the housekeeping pass republishes it
from the database. (The whole restart, with real processes, is tests/e2e/test_faults.py's.)"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from apps.server import create_server_app
from backend.settings import Settings
from backend.steps.service import publish_missing_specs
from flglm.contracts.job_spec import spec_blob_key
from tests.support.control_plane import Api, enroll, running_job

REDIS_DB = 7  # this module's own Redis database
SEALED = {"content": b"\x00" * 64, "headers": {"Content-Type": "application/octet-stream"}}


def upload_path(job_id: int) -> str:
    return f"/agent/jobs/{job_id}/rounds/1/steps/0/activations/1"


def test_step_routes_answer_503_not_500_while_redis_is_unreachable(settings: Settings) -> None:
    unreachable = settings.model_copy(update={"executor": "celery", "redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_server_app(unreachable)) as http:
        api = Api(http)
        agent = enroll(api, "owner-a")
        job_id = running_job(api, [agent], min_clients=1)  # the start commits; its spec waits for Redis
        for method, path, kwargs in (
            ("PUT", upload_path(job_id), SEALED),
            ("GET", upload_path(job_id) + "/result", {"params": {"wait_s": 0}}),
            ("GET", f"/agent/jobs/{job_id}/rounds/1/client-adapters", {"params": {"wait_s": 0}}),
        ):
            response = agent.api.request(method, path, **kwargs)
            assert response.status_code == 503, (method, path, response.text)
            assert response.json()["error"]["code"] == "store_unavailable", response.text
            assert response.headers["Retry-After"] == "1"


@pytest.fixture
def redis_backed(settings: Settings, redis_url: str) -> Iterator[tuple[Api, Settings, redis.Redis]]:
    url = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    celery_settings = settings.model_copy(
        update={"executor": "celery", "redis_url": url, "step_admission_timeout_s": 0.5}
    )
    try:
        with TestClient(create_server_app(celery_settings)) as http:
            yield Api(http), celery_settings, client
    finally:
        client.flushdb()
        client.close()


def test_a_running_job_whose_spec_redis_lost_answers_503_until_housekeeping_republishes_it(
    redis_backed: tuple[Api, Settings, redis.Redis],
) -> None:
    api, settings, client = redis_backed
    agent = enroll(api, "owner-a")
    job_id = running_job(api, [agent], min_clients=1)
    spec_key = spec_blob_key(job_id)
    assert any(spec_key in key.decode() for key in client.keys("*")), "the start published the spec"
    client.flushdb()  # what a Redis restart without persistence leaves

    response = agent.api.request("PUT", upload_path(job_id), **SEALED)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "job_not_published" and response.headers["Retry-After"]

    app = api.http.app  # type: ignore[union-attr]
    with app.state.session_factory() as session:
        assert publish_missing_specs(session, app.state.step_relay, settings) == [job_id]
    # The spec is back: the upload passes it and waits for a worker's admission (none runs here).
    response = agent.api.request("PUT", upload_path(job_id), **SEALED)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "admission_timeout", response.text


def test_the_step_relay_serves_more_waits_than_redis_pys_default_pool(
    settings: Settings, redis_url: str
) -> None:
    """FLGLM_STEP_WAIT_THREADS sizes the wait pool and the Redis pools: 150 long-polls blocked in BLPOP at
    once all get their blob (redis-py's default pool refused past 100 with `MaxConnectionsError`)."""
    from concurrent.futures import wait as wait_all

    from backend.steps.relay import step_relay_from_settings
    from flglm.wire.keys import generate_private_key

    url = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    sized = settings.model_copy(update={"executor": "celery", "redis_url": url, "step_wait_threads": 300})
    relay = step_relay_from_settings(sized, generate_private_key())
    try:
        assert relay.wait_pool._max_workers == 300
        waits = [relay.wait_pool.submit(relay.store.wait_for, f"k{i}", 20.0) for i in range(150)]
        time.sleep(1.0)  # every waiter is now inside BLPOP, one connection each
        assert not any(w.done() for w in waits), [w.exception() for w in waits if w.done()][:3]
        for i in range(150):
            relay.store.put_if_absent(f"k{i}", f"blob {i}".encode(), ttl_s=60)
        wait_all(waits, timeout=30)
        assert [w.result() for w in waits] == [f"blob {i}".encode() for i in range(150)]
    finally:
        relay.close()
        redis.Redis.from_url(url).flushdb()
