"""Queueing task functions by name: the `TaskDispatcher` interface and the Celery application both sides use.

Two dispatchers implement it: `worker.executor.InProcessExecutor` (the embedded mode: the task functions
run in this process, one lane per queue) and `CeleryDispatcher` here (production: tasks go by name to the
workers' queues on Redis, and nothing of the engine is imported, so the control plane stays torch-free).
A refused task comes back as `{"status": "rejected", ...}` and `TaskHandle.get` raises its typed refusal.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from flglm.contracts.tasks import raise_if_rejected
from flglm.step_protocol import DEFAULT_QUEUE

# How often a Celery task's state is read from the result backend while someone waits on it. Celery's own
# `AsyncResult.get` shares one pub/sub consumer that is not safe across threads, so each waiter reads the
# task's state key (one Redis GET) at this interval instead.
CELERY_STATE_INTERVAL_S = 0.05


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
    def __init__(self, app: Any, task_id: str) -> None:
        self._app, self._task_id = app, task_id

    def get(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            meta = self._app.backend.get_task_meta(self._task_id)
            state = meta.get("status")
            if state == "SUCCESS":
                return raise_if_rejected(dict(meta.get("result") or {}))
            if state in ("FAILURE", "REVOKED"):
                raise RuntimeError(f"task {self._task_id} failed: {meta.get('result')!r}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {self._task_id} did not finish in {timeout_s} s")
            time.sleep(CELERY_STATE_INTERVAL_S)


class CeleryDispatcher:
    """Sends tasks by name to the workers' queues on the Redis broker; no engine code is imported."""

    def __init__(self, redis_url: str) -> None:
        self.app = celery_app(redis_url)

    def submit(self, name: str, kwargs: dict[str, Any], queue: str, countdown_s: float = 0.0) -> TaskHandle:
        result = self.app.send_task(name, kwargs=kwargs, queue=queue, countdown=countdown_s or None)
        return _CeleryStateHandle(self.app, result.id)

    def close(self) -> None:
        self.app.close()
