"""`StepRelay`, the backend's side of the step path: blob store, dispatcher, task handles, wait pool.

`celery` queues tasks by name on the Redis broker (`flglm.contracts.dispatch.CeleryDispatcher`) and imports
nothing of the engine, so the control plane stays torch-free; `inprocess` (the embedded default) runs the
worker's task functions in this process through the dispatcher the app layer hands to `create_app`.

Waiting: a long-poll waits in a dedicated bounded thread pool (`step_wait_threads`), never in the default
threadpool that serves the other endpoints. Each waiting request holds at most two of its threads (one on
the blob, one on the task's verdict) and one pooled Redis connection in each, for at most its `wait_s`;
requests beyond the pool size queue (and a queued wait can outlast its client's timeout), so the pool is
sized for every agent of a process waiting at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from backend.settings import Settings
from flglm.contracts.blob_store import BlobStore, InMemoryBlobStore, RedisBlobStore
from flglm.contracts.dispatch import CeleryDispatcher, TaskDispatcher, TaskHandle

# The embedded mode's dispatcher, given by the app layer (the composition root): it runs the worker's task
# functions in this process, which loads torch, so the backend never imports it itself.
InProcessDispatcherFactory = Callable[[BlobStore, X25519PrivateKey, Settings], TaskDispatcher]


class StepRelay:
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

    def forget(self, key: str) -> None:
        """Drop the handle for `key` (its task was lost with the blob store's contents)."""
        with self._lock:
            self._handles.pop(key, None)

    def handle_for(self, key: str) -> TaskHandle | None:
        """None when another backend process queued it (then only the blob is waited on)."""
        with self._lock:
            return self._handles.get(key)

    def close(self) -> None:
        self.wait_pool.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.close()


class NoInProcessDispatcher(RuntimeError):
    """`executor = "inprocess"` without the dispatcher that only the app layer can give."""


def redis_pool_size(settings: Settings) -> int:
    """Connections per Redis pool: one per wait thread that may block on it, and room for the short reads
    and writes of the request threads (which wait for a free one rather than fail)."""
    return settings.step_wait_threads + 64


def step_relay_from_settings(
    settings: Settings,
    server_private_key: X25519PrivateKey,
    inprocess_dispatcher: InProcessDispatcherFactory | None = None,
) -> StepRelay:
    if settings.executor == "celery":
        return StepRelay(
            RedisBlobStore.from_url(settings.redis_url, max_connections=redis_pool_size(settings)),
            CeleryDispatcher(settings.redis_url, max_connections=redis_pool_size(settings)),
            settings.step_wait_threads,
        )
    if inprocess_dispatcher is None:
        raise NoInProcessDispatcher(
            "FLGLM_EXECUTOR=inprocess runs the worker's task functions in this process: build the app with "
            "`apps.server.create_server_app` (what `flglm serve` does), or set FLGLM_EXECUTOR=celery"
        )
    store = InMemoryBlobStore()
    return StepRelay(
        store, inprocess_dispatcher(store, server_private_key, settings), settings.step_wait_threads
    )
