"""Celery tasks: thin adapters that call the plain task functions of `worker.executor.TASK_FUNCTIONS`.

The worker process builds its `WorkerRuntime` (Redis blob store, server key) on the first task and keeps
it; replicas load lazily inside it. Transient failures (Redis unreachable) retry a bounded number of
times; a task redelivered more than `task_max_deliveries` times (it keeps killing its worker) is dropped
with an error result instead of being requeued forever.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
import torch
from celery import Task
from celery.signals import task_postrun

from flglm.contracts.blob_store import RedisBlobStore
from flglm.contracts.dispatch import DONE_TOKEN_TTL_S, task_done_key
from flglm.step_protocol import replica_queue
from flglm.wire.keys import load_private_key
from worker.admission import RedisSequenceGuard
from worker.celery_app import app, settings
from worker.executor import PRIVACY_AUDIT, REPLICA_FLUSH, TASK_FUNCTIONS, call_task
from worker.runtime import WorkerRuntime, pick_device

log = logging.getLogger(__name__)

_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()
_redis: redis.Redis | None = None
_device_slot = 0  # the replica slot whose GPU this process uses (set by `flglm worker` before it starts)


def use_device_of_slot(slot: int) -> None:
    """Pick this process's device from its replica slot (GPU slot % GPU count; see engine.pick_device)."""
    global _device_slot
    _device_slot = slot


def _redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(settings.redis_url)
    return _redis


def _schedule_flush(job_id: int, replica: int, delay_s: float) -> None:
    app.send_task(
        REPLICA_FLUSH,
        kwargs={"job_id": job_id, "replica": replica},
        queue=replica_queue(replica),
        countdown=delay_s,
    )


def worker_runtime() -> WorkerRuntime:
    """This process's runtime, built on the first task (nothing is loaded before a job needs it)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            device = pick_device(_device_slot, settings.worker_device)
            if device.type == "cuda":
                torch.cuda.set_device(device)  # libraries that allocate on plain "cuda" land on our GPU too
            _runtime = WorkerRuntime(
                RedisBlobStore(_redis_client()),
                load_private_key(settings.resolved_server_key_file()),
                _schedule_flush,
                device=device,
                upload_guard=RedisSequenceGuard(_redis_client()),
            )
        return _runtime


def _too_many_deliveries(task_id: str | None, attempt: int) -> bool:
    if task_id is None:
        return False
    key = f"flglm:deliveries:{task_id}:{attempt}"  # a retry is a new attempt with its own count
    count = int(_redis_client().incr(key))  # type: ignore[arg-type]
    _redis_client().expire(key, 24 * 3600)
    return count > settings.task_max_deliveries


# A privacy audit runs for minutes, possibly past the broker's visibility timeout: it is acknowledged on
# receipt so that Redis never hands it to a second worker while it runs. A worker that dies loses it; the
# control plane marks it failed once its heartbeat stops (flglm.contracts.privacy_records).
ACKED_ON_RECEIPT = frozenset({PRIVACY_AUDIT})


def _register(name: str) -> None:
    @app.task(
        name=name,
        bind=True,
        acks_late=name not in ACKED_ON_RECEIPT,
        reject_on_worker_lost=name not in ACKED_ON_RECEIPT,
        autoretry_for=(redis.ConnectionError, redis.TimeoutError),
        max_retries=settings.task_max_retries,
        retry_backoff=True,
        retry_backoff_max=30,
    )
    def run(self: Task, **kwargs: Any) -> dict[str, Any]:
        if _too_many_deliveries(self.request.id, int(self.request.retries or 0)):
            log.error("task %s (%s) was delivered too often; dropping it", name, self.request.id)
            return {
                "status": "dropped",
                "message": f"delivered more than {settings.task_max_deliveries} times",
            }
        return call_task(worker_runtime(), name, kwargs)


for _name in TASK_FUNCTIONS:
    _register(_name)


@task_postrun.connect
def _announce_done(task_id: str | None = None, **_: Any) -> None:
    """The task's result (or failure) is stored: wake whoever waits on it (`CeleryDispatcher` handles)."""
    if task_id is None:
        return
    try:
        with _redis_client().pipeline(transaction=False) as pipe:
            pipe.rpush(task_done_key(task_id), b"1")
            pipe.expire(task_done_key(task_id), DONE_TOKEN_TTL_S)
            pipe.execute()
    except redis.RedisError:  # a waiter still reads the task's state every DONE_WAIT_SLICE_S
        log.warning("could not announce task %s as done", task_id, exc_info=True)
