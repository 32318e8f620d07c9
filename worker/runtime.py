"""`WorkerRuntime`: what one worker process holds (blob store, server keys, its cached replicas).

Tasks carry ids and message refs only (JSON); tensors travel through the blob store. A worker process
loads nothing until a job's first task arrives, then keeps that job's replica (body on the GPU when there
is one) in `WorkerRuntime.replicas` until the job ends: the backend then queues `flglm.release_job` on
every replica queue of the job (behind the round-end checkpoint, same queue), which drops the replica.
Anything missed (a backend restart between its commit and the release, a lost message) is caught by the
idle TTL: after every task, a replica unused for `replica_idle_ttl_s` that holds no step in flight is
checkpointed and dropped. Either way a later task of that job (an eval forward after the job completed)
reloads it from its checkpoint (+ journal), as after a crash.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from torch import nn

from flglm.contracts.blob_store import BlobStore
from flglm.contracts.job_spec import read_job_spec
from flglm.contracts.refusals import JobKeyDeleted
from flglm.models import load_server_body_with_adapters
from flglm.split import SplitPlan
from flglm.step_protocol import WorkerJobSpec
from flglm.wire.keys import load_private_key
from flglm.wire.sequence import ReplayGuard, SequenceGuard
from worker.generation import GenerationSessions
from worker.replica import ServerReplica
from worker.settings import get_worker_settings

log = logging.getLogger(__name__)

# (job id, replica, delay in seconds): make `run_replica_flush` run on that replica's queue later.
FlushScheduler = Callable[[int, int, float], None]
# A replica loaded again after its job's release (the agents' final evaluation runs after the job completed)
# serves a short burst of eval forwards: it leaves memory after this much idle time, not the full TTL.
RELEASED_REPLICA_IDLE_TTL_S = 60.0
_RELEASED_REMEMBERED = 4096  # released (job, replica) keys this process remembers, newest kept


def pick_device(slot: int = 0, override: str | None = None) -> torch.device:
    """The device of the worker serving replica `slot`: `override` (FLGLM_WORKER_DEVICE) when set, else GPU
    slot % GPU count (`--scale worker=N` gives every container all GPUs), else the CPU."""
    if override:
        return torch.device(override)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device("cuda", slot % gpus) if gpus else torch.device("cpu")


def load_server_body(spec: WorkerJobSpec) -> nn.Module:
    """Only the body's weights, with the job's server-side adapters (same seed as every client)."""
    plan = SplitPlan(spec.split_plan.front_layers, spec.split_plan.back_layers)
    return load_server_body_with_adapters(spec.model_ref, plan, spec.adapter, spec.seed)


class WorkerRuntime:
    """What one worker process holds: the blob store, the server keys and its cached replicas.

    `server_private_key` is the deployment's key; a job whose spec names its own key file
    (`WorkerJobSpec.server_key_file`) uses that one instead (`server_key_for`), cached here until the job's
    release and checked to still exist on every use, so once the backend deleted it this process refuses
    the job's messages too (`JobKeyDeleted`), whatever it still holds in memory.
    """

    def __init__(
        self,
        store: BlobStore,
        server_private_key: X25519PrivateKey,
        schedule_flush: FlushScheduler,
        device: torch.device | None = None,
        upload_guard: SequenceGuard | None = None,
        replica_idle_ttl_s: float | None = None,
    ) -> None:
        settings = get_worker_settings()
        self.store = store
        # Replay guard of upload admission (shared by all processes when it lives in Redis).
        self.upload_guard: SequenceGuard = upload_guard or ReplayGuard()
        self.server_private_key = server_private_key
        self.schedule_flush = schedule_flush
        self.device = device or pick_device()
        self.replicas: dict[tuple[int, int], ServerReplica] = {}
        self.replica_idle_ttl_s = (
            settings.replica_idle_ttl_s if replica_idle_ttl_s is None else replica_idle_ttl_s
        )
        self.released_replica_idle_ttl_s = RELEASED_REPLICA_IDLE_TTL_S
        self._last_used: dict[tuple[int, int], float] = {}  # monotonic time a task last asked for it
        self._released: OrderedDict[tuple[int, int], None] = OrderedDict()
        # Generation sessions (body + KV cache per session) of the caller-side split generation.
        self.generation = GenerationSessions.from_settings(settings, self.device)
        self._lock = threading.Lock()
        self._loading: dict[tuple[int, int], threading.Lock] = {}  # one per replica being loaded
        self._job_keys: dict[int, X25519PrivateKey] = {}
        self._job_keys_lock = threading.Lock()  # apart from `_lock`: `replica` asks for keys while holding it

    def server_key_for(self, spec: WorkerJobSpec) -> X25519PrivateKey:
        """The server private key of `spec`'s job: its own key file, else the deployment key."""
        if spec.server_key_file is None:
            return self.server_private_key
        with self._job_keys_lock:
            if not os.path.exists(spec.server_key_file):
                self._job_keys.pop(spec.job_id, None)
                raise JobKeyDeleted(
                    f"job {spec.job_id}'s server key was deleted (its retention after the job ended ran "
                    "out); its messages can no longer be opened"
                )
            if spec.job_id not in self._job_keys:
                try:
                    self._job_keys[spec.job_id] = load_private_key(spec.server_key_file)  # refuses non-0600
                except FileNotFoundError:
                    raise JobKeyDeleted(f"job {spec.job_id}'s server key was deleted just now") from None
            return self._job_keys[spec.job_id]

    def replica(self, job_id: int, replica: int) -> ServerReplica:
        """The cached replica, loading body + checkpoint (+ journal replay) on the job's first task.

        The load (seconds to minutes for a large body) holds only that replica's loading lock, never the
        runtime-wide one: tasks of the process's other replicas, evictions and releases go on meanwhile."""
        key = (job_id, replica)
        held = self._held_for_use(key)
        if held is not None:
            return held
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            held = self._held_for_use(key)  # loaded by a concurrent call while this one waited
            if held is not None:
                return held
            spec = read_job_spec(self.store, job_id)
            server_key = self.server_key_for(spec)  # before the body loads: a deleted key refuses at once
            again = " again after its release" if key in self._released else ""
            log.info(
                "loading job %s replica %s (%s) on %s%s", job_id, replica, spec.model_ref, self.device, again
            )
            loaded = ServerReplica(
                spec,
                replica,
                load_server_body(spec),
                self.store,
                server_key,
                lambda delay: self.schedule_flush(job_id, replica, delay),
                self.device,
            )
            with self._lock:
                self.replicas[key] = loaded
                self._last_used[key] = time.monotonic()
                self._loading.pop(key, None)
            return loaded

    def _held_for_use(self, key: tuple[int, int]) -> ServerReplica | None:
        """The replica if loaded, marked used now; refuses (and drops it) once the job's key file is gone."""
        with self._lock:
            held = self.replicas.get(key)
            if held is None:
                return None
            try:
                self.server_key_for(held.spec)
            except JobKeyDeleted:
                del self.replicas[key]
                self._last_used.pop(key, None)
                raise
            self._last_used[key] = time.monotonic()
            return held

    def held(self, job_id: int, replica: int) -> ServerReplica | None:
        """The replica if it is in memory (never loads it, nor counts as a use)."""
        with self._lock:
            return self.replicas.get((job_id, replica))

    def forget(self, job_id: int, replica: int | None = None) -> list[int]:
        """Drop a finished job's replicas (or only `replica`) from memory, checkpointing nothing; returns the
        replica numbers dropped. Only the process consuming a replica's queue may drop it mid-job. If a
        later task loads one again, it is evicted after `released_replica_idle_ttl_s` of idleness."""
        with self._lock:
            keys = [k for k in self.replicas if k[0] == job_id and replica in (None, k[1])]
            for key in keys:
                del self.replicas[key]
                self._last_used.pop(key, None)
            released = set(keys)
            if replica is not None:
                released.add((job_id, replica))  # remembered even when it was not loaded here
            for key in released:
                self._released[key] = None
                self._released.move_to_end(key)
            while len(self._released) > _RELEASED_REMEMBERED:
                self._released.popitem(last=False)
        with self._job_keys_lock:
            self._job_keys.pop(job_id, None)  # a later task of the job loads it again while it exists
        if keys:
            log.info("released job %s replicas %s", job_id, [k[1] for k in keys])
            self._free_memory()
        return [k[1] for k in keys]

    def evict_idle_replicas(self) -> list[tuple[int, int]]:
        """Checkpoint and drop every replica unused for longer than `replica_idle_ttl_s` (the shorter
        `released_replica_idle_ttl_s` for a released job's) that is not busy (see
        `ServerReplica.checkpoint_if_idle`); a replica whose checkpoint fails stays. Returns the keys."""
        now = time.monotonic()
        evicted = []
        with self._lock:
            for key, last_used in list(self._last_used.items()):
                ttl_s = self.replica_idle_ttl_s
                if key in self._released:
                    ttl_s = min(ttl_s, self.released_replica_idle_ttl_s)
                if now - last_used <= ttl_s:
                    continue
                try:
                    if not self.replicas[key].checkpoint_if_idle():
                        continue
                except Exception:  # a full disk, say: keep the replica (its state lives nowhere else)
                    log.exception("job %s replica %s: idle checkpoint failed; keeping it", *key)
                    continue
                del self.replicas[key]
                del self._last_used[key]
                evicted.append(key)
        if evicted:
            log.info("evicted idle replicas %s", evicted)
            self._free_memory()
        return evicted

    def _free_memory(self) -> None:
        """Return a dropped replica's memory now: its module graph may hold reference cycles, and PyTorch's
        CUDA allocator keeps freed blocks cached for this process unless told otherwise."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
