"""What the step endpoints run on: the blob store, a task dispatcher, task handles and the long-poll pool.

`inprocess` (embedded default) runs the worker's task functions in this process (`worker.executor`, which
loads torch: that is the embedded mode by design); `celery` queues them on the Redis broker by name and
imports nothing of the engine, so the control plane stays torch-free.

Waiting: a long-poll waits in a dedicated bounded thread pool (`step_wait_threads`), never in the default
threadpool that serves the other endpoints. Each waiting request holds at most two of its threads (one on
the blob, one on the task's verdict) for at most its `wait_s`; requests beyond the pool size queue.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from backend.settings import Settings
from worker.blob_store import BlobStore, InMemoryBlobStore, RedisBlobStore
from worker.routing import RELEASE_JOB, raise_if_rejected

# How often a Celery task's state is read from the result backend while someone waits on it. Celery's own
# `AsyncResult.get` shares one pub/sub consumer that is not safe across threads, so each waiter reads the
# task's state key (one Redis GET) at this interval instead.
CELERY_STATE_INTERVAL_S = 0.05


class TaskHandle(Protocol):
    def get(self, timeout_s: float) -> dict[str, Any]:
        """The task's JSON result (raising its typed refusal); TimeoutError when it is not done in time."""
        ...


class TaskDispatcher(Protocol):
    def submit(
        self, name: str, kwargs: dict[str, Any], queue: str, countdown_s: float = 0.0
    ) -> TaskHandle: ...

    def close(self) -> None: ...


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
        from celery import Celery

        self.app = Celery("flglm", broker=redis_url, backend=redis_url)
        self.app.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
        )

    def submit(self, name: str, kwargs: dict[str, Any], queue: str, countdown_s: float = 0.0) -> TaskHandle:
        result = self.app.send_task(name, kwargs=kwargs, queue=queue, countdown=countdown_s or None)
        return _CeleryStateHandle(self.app, result.id)

    def close(self) -> None:
        self.app.close()


class _Answered:
    """The handle of a task answered without running it."""

    def __init__(self, result: dict[str, Any]) -> None:
        self._result = result

    def get(self, timeout_s: float) -> dict[str, Any]:
        return self._result


class InProcessDispatcher:
    """The embedded default: `worker.executor.InProcessExecutor`, built on the first task, so a control
    plane that never serves a step never imports torch."""

    def __init__(
        self, store: BlobStore, server_private_key: X25519PrivateKey, replica_idle_ttl_s: float | None = None
    ) -> None:
        self._store, self._key = store, server_private_key
        self._replica_idle_ttl_s = replica_idle_ttl_s
        self._executor: Any = None
        self._lock = threading.Lock()

    def submit(self, name: str, kwargs: dict[str, Any], queue: str, countdown_s: float = 0.0) -> TaskHandle:
        with self._lock:
            if self._executor is None and name == RELEASE_JOB:
                return _Answered({"status": "released", "dropped": []})  # no task ran: nothing is loaded
            if self._executor is None:
                from worker.executor import InProcessExecutor  # loads the engine and torch

                self._executor = InProcessExecutor(self._store, self._key, self._replica_idle_ttl_s)
            executor = self._executor
        handle: TaskHandle = executor.submit(name, kwargs, queue, countdown_s)
        return handle

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.close()


class StepRuntime:
    """The blob store, the dispatcher, the handles of the tasks this process queued, and the wait pool."""

    def __init__(
        self, store: BlobStore, dispatcher: TaskDispatcher, wait_threads: int, max_handles: int = 10_000
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.wait_pool = ThreadPoolExecutor(max_workers=wait_threads, thread_name_prefix="step-wait")
        self._handles: OrderedDict[str, TaskHandle] = OrderedDict()
        self._max_handles = max_handles
        self._lock = threading.Lock()

    def remember(self, key: str, handle: TaskHandle) -> None:
        """Keep the handle of the task that will produce the result at `key` (newest `max_handles`)."""
        with self._lock:
            self._handles[key] = handle
            self._handles.move_to_end(key)
            while len(self._handles) > self._max_handles:
                self._handles.popitem(last=False)

    def handle_for(self, key: str) -> TaskHandle | None:
        """None when another backend process queued it (then only the blob is waited on)."""
        with self._lock:
            return self._handles.get(key)

    def close(self) -> None:
        self.wait_pool.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.close()


def step_runtime_from_settings(settings: Settings, server_private_key: X25519PrivateKey) -> StepRuntime:
    if settings.executor == "celery":
        return StepRuntime(
            RedisBlobStore.from_url(settings.redis_url),
            CeleryDispatcher(settings.redis_url),
            settings.step_wait_threads,
        )
    store = InMemoryBlobStore()
    dispatcher = InProcessDispatcher(store, server_private_key, settings.replica_idle_ttl_s)
    return StepRuntime(store, dispatcher, settings.step_wait_threads)
