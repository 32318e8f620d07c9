"""Queueing task functions by name: the `TaskDispatcher` interface and the Celery application both sides use.

Two dispatchers implement it: `worker.executor.InProcessExecutor` (the embedded mode: the task functions
run in this process, one lane per queue) and `CeleryDispatcher` here (production: tasks go by name to the
workers' queues on Redis, and nothing of the engine is imported, so the control plane stays torch-free).
A refused task comes back as `{"status": "rejected", ...}` and `TaskHandle.get` raises its typed refusal.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import redis

from flglm.contracts.blob_store import DEFAULT_MAX_CONNECTIONS, pooled_redis
from flglm.contracts.tasks import raise_if_rejected
from flglm.step_protocol import DEFAULT_QUEUE

# Waiting for a Celery task without polling: Celery's own `AsyncResult.get` shares one pub/sub consumer that
# is not safe across threads, and reading the task's state every 50 ms from each of 200 waiting requests
# took the control plane's whole core. Instead the worker pushes a token on `task_done_key(id)` once the
# task's result is stored (`worker.tasks`, Celery's task_postrun), and a waiter sleeps in BLPOP on it,
# reading the state when woken or every `DONE_WAIT_SLICE_S` (a worker that pushes nothing is still heard).
DONE_WAIT_SLICE_S = 2.0
DONE_TOKEN_TTL_S = 600


def task_done_key(task_id: str) -> str:
    """The Redis list a worker pushes a token on when task `task_id` finished (its result is stored)."""
    return f"flglm:task-done:{task_id}"


class TaskHandle(Protocol):
    def get(self, timeout_s: float) -> dict[str, Any]:
        """The task's JSON result (raising its typed refusal); TimeoutError when it is not done in time."""
        ...


class TaskDispatcher(Protocol):
    def submit(self, name: str, kwargs: dict[str, Any], queue: str, countdown_s: float = 0.0) -> TaskHandle:
        """Queue task `name` with JSON `kwargs` on `queue`, to start after `countdown_s`."""
        ...

    def close(self) -> None: ...


def celery_app(redis_url: str, **conf: Any) -> Any:
    """The Celery application on Redis (broker and result backend), JSON only; `conf` adds settings."""
    from celery import Celery

    app = Celery("flglm", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=DEFAULT_QUEUE,
        **conf,
    )
    return app


class _CeleryStateHandle:
    def __init__(self, app: Any, task_id: str, notices: redis.Redis) -> None:
        self._app, self._task_id, self._notices = app, task_id, notices

    def get(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        done_key = task_done_key(self._task_id)
        while True:
            meta = self._app.backend.get_task_meta(self._task_id)
            state = meta.get("status")
            if state == "SUCCESS":
                return raise_if_rejected(dict(meta.get("result") or {}))
            if state in ("FAILURE", "REVOKED"):
                raise RuntimeError(f"task {self._task_id} failed: {meta.get('result')!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"task {self._task_id} did not finish in {timeout_s} s")
            if self._notices.blpop([done_key], timeout=min(max(remaining, 0.01), DONE_WAIT_SLICE_S)):
                self._notices.rpush(done_key, b"1")  # hand the token on to any other waiter of the task
                self._notices.expire(done_key, DONE_TOKEN_TTL_S)


class CeleryDispatcher:
    """Sends tasks by name to the workers' queues on the Redis broker; no engine code is imported."""

    def __init__(self, redis_url: str, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        # Both pools hold a connection per waiting thread: the result backend's (task states) and the
        # notices' (every waiter's BLPOP); bounded and blocking, never redis-py's failing default of 100.
        self.app = celery_app(redis_url, redis_max_connections=max_connections)
        self._notices = pooled_redis(redis_url, max_connections)

    def submit(self, name: str, kwargs: dict[str, Any], queue: str, countdown_s: float = 0.0) -> TaskHandle:
        result = self.app.send_task(name, kwargs=kwargs, queue=queue, countdown=countdown_s or None)
        return _CeleryStateHandle(self.app, result.id, self._notices)

    def close(self) -> None:
        self.app.close()
        self._notices.close()
