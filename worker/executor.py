"""The task functions by name (`TASK_FUNCTIONS`, which Celery workers register too) and `InProcessExecutor`.

`InProcessExecutor` is the embedded mode's `TaskDispatcher`: it runs the same functions in this process and
returns the same JSON as a Celery worker would (a refused step comes back as `{"status": "rejected", ...}`
and `TaskHandle.get` raises the typed refusal again). Each queue is a single thread, like the one solo
Celery worker that consumes a replica queue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.contracts import refusals as errors
from flglm.contracts.blob_store import BlobStore
from flglm.contracts.dispatch import TaskHandle
from flglm.contracts.tasks import (
    ADMIT_UPLOAD,
    BODY_GENERATE,
    BODY_GENERATE_CLOSE,
    BODY_GENERATE_OPEN,
    CLIENT_FEDAVG,
    DROP_CLIENT,
    PRIVACY_AUDIT,
    RELEASE_JOB,
    REPLICA_COUNTERS,
    REPLICA_FLUSH,
    ROUND_END,
    SERVER_BACKWARD,
    SERVER_EVAL_FORWARD,
    SERVER_FORWARD,
    raise_if_rejected,
    rejection_result,
)
from flglm.step_protocol import MessageRef, replica_queue
from worker.admission import run_admit_upload
from worker.fedavg import run_client_fedavg
from worker.generation import run_body_generate, run_body_generate_close, run_body_generate_open
from worker.privacy_audit import run_privacy_audit_task
from worker.runtime import WorkerRuntime

# ---- the step tasks: plain functions of (runtime, JSON arguments) -> JSON result -----------------------


def run_server_forward(
    runtime: WorkerRuntime, job_id: int, replica: int, message: dict[str, Any]
) -> dict[str, Any]:
    ref = MessageRef.model_validate(message)
    return runtime.replica(job_id, replica).submit_forward(ref)


def run_server_backward(
    runtime: WorkerRuntime, job_id: int, replica: int, message: dict[str, Any]
) -> dict[str, Any]:
    ref = MessageRef.model_validate(message)
    return runtime.replica(job_id, replica).submit_backward(ref)


def run_server_eval_forward(
    runtime: WorkerRuntime, job_id: int, replica: int, message: dict[str, Any]
) -> dict[str, Any]:
    ref = MessageRef.model_validate(message)
    return runtime.replica(job_id, replica).submit_eval_forward(ref)


def run_replica_flush(runtime: WorkerRuntime, job_id: int, replica: int) -> dict[str, Any]:
    """A replica's timer. One that left memory (released, evicted, or its process restarted) has nothing
    to flush, since waiting forwards and graphs live only in memory: never load it for this."""
    held = runtime.held(job_id, replica)
    if held is None:
        return {"status": "not_loaded"}
    return held.flush()


def run_round_end(runtime: WorkerRuntime, job_id: int, replica: int, round_number: int) -> dict[str, Any]:
    return runtime.replica(job_id, replica).end_round(round_number)


def run_release_job(runtime: WorkerRuntime, job_id: int, replica: int) -> dict[str, Any]:
    """The job ended: drop its replica from this process (queued behind the round-end checkpoint)."""
    return {"status": "released", "dropped": runtime.forget(job_id, replica)}


def run_drop_client(runtime: WorkerRuntime, job_id: int, replica: int, client_id: int) -> dict[str, Any]:
    """The backend dropped the client from its round (offline, revoked, withdrawn): a replica in memory stops
    waiting for it; one that is not loaded holds nothing of it (never load it for this)."""
    held = runtime.held(job_id, replica)
    if held is None:
        return {"status": "not_loaded"}
    return held.drop_client(client_id)


def replica_counters(runtime: WorkerRuntime, job_id: int, replica: int, load: bool = True) -> dict[str, Any]:
    """Step counters of a replica (for monitoring and tests); with `load=False`, a replica that is not in
    this process's memory answers `{"loaded": False}` instead of being loaded."""
    held = runtime.replica(job_id, replica) if load else runtime.held(job_id, replica)
    if held is None:
        return {"loaded": False}
    return {"server_steps": held.server_steps, "applied": sorted(held.applied)}


TaskFunction = Callable[..., dict[str, Any]]

TASK_FUNCTIONS: dict[str, TaskFunction] = {
    SERVER_FORWARD: run_server_forward,
    SERVER_BACKWARD: run_server_backward,
    SERVER_EVAL_FORWARD: run_server_eval_forward,
    REPLICA_FLUSH: run_replica_flush,
    ROUND_END: run_round_end,
    CLIENT_FEDAVG: run_client_fedavg,
    REPLICA_COUNTERS: replica_counters,
    RELEASE_JOB: run_release_job,
    DROP_CLIENT: run_drop_client,
    ADMIT_UPLOAD: run_admit_upload,
    BODY_GENERATE_OPEN: run_body_generate_open,
    BODY_GENERATE: run_body_generate,
    BODY_GENERATE_CLOSE: run_body_generate_close,
    PRIVACY_AUDIT: run_privacy_audit_task,
}


def call_task(runtime: WorkerRuntime, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run one task function; a refusal becomes a JSON result (never a retry: the input is at fault).
    Afterwards, replicas idle past the runtime's TTL leave memory (no timer thread: tasks drive it)."""
    try:
        return TASK_FUNCTIONS[name](runtime, **kwargs)
    except errors.StepRejected as exc:
        return rejection_result(exc)
    finally:
        runtime.evict_idle_replicas()


class _FutureHandle:
    def __init__(self, future: Future[dict[str, Any]]) -> None:
        self._future = future

    def get(self, timeout_s: float) -> dict[str, Any]:
        # concurrent.futures raises the builtin TimeoutError (an alias since Python 3.11).
        return raise_if_rejected(self._future.result(timeout=timeout_s))


class InProcessExecutor:
    """Runs the task functions in this process: one single-threaded lane per queue, timers for countdowns."""

    def __init__(
        self, store: BlobStore, server_private_key: X25519PrivateKey, replica_idle_ttl_s: float | None = None
    ) -> None:
        self.runtime = WorkerRuntime(
            store, server_private_key, self._schedule_flush, replica_idle_ttl_s=replica_idle_ttl_s
        )
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        self._closed = False

    def _lane(self, queue: str) -> ThreadPoolExecutor:
        with self._lock:
            if queue not in self._lanes:
                self._lanes[queue] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lane-{queue}")
            return self._lanes[queue]

    def submit(self, name: str, kwargs: dict[str, Any], queue: str, countdown_s: float = 0.0) -> TaskHandle:
        if name not in TASK_FUNCTIONS:
            raise KeyError(f"unknown task {name!r}")
        if countdown_s <= 0:
            return _FutureHandle(self._lane(queue).submit(call_task, self.runtime, name, kwargs))
        outer: Future[dict[str, Any]] = Future()

        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
                if self._closed:
                    return
            inner = self._lane(queue).submit(call_task, self.runtime, name, kwargs)
            inner.add_done_callback(lambda done: _copy_result(done, outer))

        timer = threading.Timer(countdown_s, fire)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()
        return _FutureHandle(outer)

    def _schedule_flush(self, job_id: int, replica: int, delay_s: float) -> None:
        if not self._closed:
            self.submit(
                REPLICA_FLUSH, {"job_id": job_id, "replica": replica}, replica_queue(replica), delay_s
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timers, self._timers = list(self._timers), set()
            lanes = list(self._lanes.values())
        for timer in timers:
            timer.cancel()
        for lane in lanes:
            lane.shutdown(wait=True, cancel_futures=True)


def _copy_result(source: Future[dict[str, Any]], target: Future[dict[str, Any]]) -> None:
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())
