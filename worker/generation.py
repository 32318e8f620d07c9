"""Generation sessions on a worker: the job's body with its newest server adapters, one KV cache per session.

The caller (the backend's generate route, or `flglm generate` through the session routes) runs the front and
back with their caches; this process runs the body of every call of a session with that session's
`DynamicCache`, so only the new positions' hidden states cross the cut. All three tasks go to
`replica_queue(0)`, which exactly one process consumes (one solo Celery worker, or one in-process lane), so a
session's cache is always where its next call lands.

Bodies are shared by the sessions of the same (model, split plan, adapter config, checkpoint file); the
caches are not. A session is dropped when closed, when unused for `idle_ttl_s`, or, as the least recently
used, when a new one would exceed `max_sessions`; a body without sessions is dropped with its last one.
A call on a session that is not here is the typed refusal `UnknownGenerationSession` (HTTP 404).

A body call is not idempotent (it appends to the cache), so each call must continue the cache exactly: its
mask covers the cached tokens plus its new ones, else `GenerationOutOfOrder` (409). A Celery task redelivered
after its worker died finds no session (the cache died with that process) and is refused the same way.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from flglm.adapters import AdapterSpec, load_trainable_state_dict
from flglm.contracts.artifacts import latest_server_checkpoint
from flglm.contracts.refusals import (
    GenerationOutOfOrder,
    MissingMessage,
    NoServerCheckpoint,
    UnknownGenerationSession,
    WrongTensor,
)
from flglm.generation import decode_body_input, encode_body_output
from flglm.generation_protocol import BLOB_TTL_S, MAX_SESSION_BATCH, MAX_SESSION_TOKENS
from flglm.models import load_server_body_with_adapters
from flglm.split import ServerBody, SplitPlan
from flglm.wire.errors import WireError
from worker.checkpoints import load_snapshot
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BodyKey:
    """What makes two sessions' bodies identical: the model, where it is cut, the adapters and their file."""

    model_ref: str
    front_layers: int
    back_layers: int
    adapter_json: str  # the job's adapter config as sorted JSON (hashable)
    checkpoint: str  # path of the server adapter checkpoint loaded into the body


def load_generation_body(key: BodyKey, device: torch.device) -> ServerBody:
    """Only the body's weights, with the server adapters of `key.checkpoint`, in eval mode on `device`."""
    plan = SplitPlan(key.front_layers, key.back_layers)
    adapter = AdapterSpec(**json.loads(key.adapter_json))
    body = load_server_body_with_adapters(key.model_ref, plan, adapter, seed=0)  # overwritten just below
    load_trainable_state_dict(body, load_snapshot(Path(key.checkpoint)).adapters)
    return body.eval().requires_grad_(False).to(device)


@dataclass
class GenerationSession:
    """One generation's body KV cache; `run` appends the new positions of every row."""

    body_key: BodyKey
    body: ServerBody
    cache: DynamicCache
    last_used: float
    batch_size: int | None = None  # fixed by the first call
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def hidden_size(self) -> int:
        return int(self.body.stack.config.hidden_size)

    @property
    def cached_tokens(self) -> int:
        return self.body.stack.past_length(self.cache)

    @torch.no_grad()
    def run(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The body's output for the new positions (batch, new, hidden), in the input's dtype, on the CPU."""
        batch, new = hidden_states.shape[0], hidden_states.shape[1]
        with self.lock:
            if self.batch_size is not None and batch != self.batch_size:
                raise GenerationOutOfOrder(f"batch {batch} in a session of batch {self.batch_size}")
            cached = self.cached_tokens
            # The mask was checked against MAX_SESSION_TOKENS, so this also bounds the cache.
            if attention_mask.shape[1] != cached + new:
                raise GenerationOutOfOrder(
                    f"attention_mask covers {attention_mask.shape[1]} tokens; the session cached {cached} "
                    f"and this call adds {new}, so it must cover {cached + new}"
                )
            parameter = next(self.body.parameters())
            output = self.body(
                hidden_states.to(parameter.device, parameter.dtype),
                attention_mask.to(parameter.device),
                past_key_values=self.cache,
            )  # (batch, new, hidden)
            self.batch_size = batch
            return output.to("cpu", hidden_states.dtype)


class GenerationSessions:
    """The sessions of one worker process, by (job id, session id), with idle TTL and an LRU cap."""

    def __init__(
        self,
        device: torch.device,
        idle_ttl_s: float = 300.0,
        max_sessions: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1 or idle_ttl_s <= 0:
            raise ValueError(f"need max_sessions >= 1 and idle_ttl_s > 0, got {max_sessions}, {idle_ttl_s}")
        self.device, self.idle_ttl_s, self.max_sessions = device, idle_ttl_s, max_sessions
        self._clock = clock
        self._sessions: OrderedDict[tuple[int, str], GenerationSession] = OrderedDict()  # oldest use first
        self._bodies: dict[BodyKey, ServerBody] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: WorkerSettings, device: torch.device) -> GenerationSessions:
        return cls(device, settings.generation_session_ttl_s, settings.generation_max_sessions)

    def open(self, job_id: int, session_id: str, body_key: BodyKey) -> GenerationSession:
        """A new session (the same one again for a repeated open), loading its body unless shared."""
        with self._lock:
            self._evict_idle()
            key = (job_id, session_id)
            if key in self._sessions:
                return self._touch(key)
            if body_key not in self._bodies:
                log.info(
                    "loading the generation body of job %s (%s) on %s",
                    job_id,
                    body_key.checkpoint,
                    self.device,
                )
                self._bodies[body_key] = load_generation_body(body_key, self.device)
            body = self._bodies[body_key]
            cache = DynamicCache(config=body.stack.config)  # type: ignore[arg-type]
            self._sessions[key] = GenerationSession(body_key, body, cache, self._clock())
            while len(self._sessions) > self.max_sessions:
                evicted, _ = self._sessions.popitem(last=False)
                log.info(
                    "generation session %s of job %s evicted (cap %s)",
                    evicted[1],
                    evicted[0],
                    self.max_sessions,
                )
            self._drop_unused_bodies()
            return self._sessions[key]

    def get(self, job_id: int, session_id: str) -> GenerationSession:
        """The session, now most recently used; `UnknownGenerationSession` when it is not here."""
        with self._lock:
            self._evict_idle()
            key = (job_id, session_id)
            if key not in self._sessions:
                raise UnknownGenerationSession(
                    f"generation session {session_id} of job {job_id} is not open on this worker (closed, "
                    f"idle for more than {self.idle_ttl_s:g} s, evicted by newer sessions beyond "
                    f"{self.max_sessions}, or lost with its worker): open a new session"
                )
            return self._touch(key)

    def close(self, job_id: int, session_id: str) -> bool:
        """Drop the session; False when it was not here."""
        with self._lock:
            closed = self._sessions.pop((job_id, session_id), None) is not None
            self._evict_idle()
            return closed

    def open_sessions(self) -> list[tuple[int, str]]:
        with self._lock:
            self._evict_idle()
            return list(self._sessions)

    def loaded_bodies(self) -> int:
        with self._lock:
            return len(self._bodies)

    def _touch(self, key: tuple[int, str]) -> GenerationSession:
        session = self._sessions[key]
        session.last_used = self._clock()
        self._sessions.move_to_end(key)
        return session

    def _evict_idle(self) -> None:
        cutoff = self._clock() - self.idle_ttl_s
        for key in [k for k, s in self._sessions.items() if s.last_used <= cutoff]:
            del self._sessions[key]
            log.info("generation session %s of job %s expired (idle %s s)", key[1], key[0], self.idle_ttl_s)
        self._drop_unused_bodies()

    def _drop_unused_bodies(self) -> None:
        used = {session.body_key for session in self._sessions.values()}
        for key in [k for k in self._bodies if k not in used]:
            del self._bodies[key]


# ---- the task bodies: plain functions of (runtime, JSON arguments) -> JSON result ------------------------


def run_body_generate_open(
    runtime: WorkerRuntime,
    job_id: int,
    session_id: str,
    model_ref: str,
    split_plan: dict[str, int],
    adapter: dict[str, Any],
    checkpoint_dir: str,
) -> dict[str, Any]:
    """Open a session on the job's newest replica-0 server checkpoint (replicas are averaged at round end)."""
    checkpoint = latest_server_checkpoint(checkpoint_dir, replica=0)
    if checkpoint is None:
        raise NoServerCheckpoint(f"job {job_id} has no server adapter checkpoint yet: generate after a round")
    body_key = BodyKey(
        model_ref,
        int(split_plan["front_layers"]),
        int(split_plan["back_layers"]),
        json.dumps(adapter, sort_keys=True),
        str(checkpoint),
    )
    session = runtime.generation.open(job_id, session_id, body_key)
    return {
        "session_id": session_id,
        "hidden_size": session.hidden_size,
        "server_checkpoint": checkpoint.name,
        "idle_ttl_s": runtime.generation.idle_ttl_s,
    }


def run_body_generate(
    runtime: WorkerRuntime, job_id: int, session_id: str, input_key: str, output_key: str
) -> dict[str, Any]:
    """One body call: the input blob (hidden states + mask) through the session's body, the output blob."""
    session = runtime.generation.get(job_id, session_id)
    data = runtime.store.get(input_key)
    if data is None:
        raise MissingMessage(
            f"the body input {input_key} is not in the blob store (never stored, or expired)"
        )
    try:
        hidden, mask = decode_body_input(data, session.hidden_size, MAX_SESSION_BATCH, MAX_SESSION_TOKENS)
    except WireError as exc:
        raise WrongTensor(str(exc)) from None
    output = session.run(hidden, mask)  # (batch, new, hidden)
    runtime.store.put_if_absent(output_key, encode_body_output(output), BLOB_TTL_S)
    return {"output_key": output_key, "cached_tokens": session.cached_tokens}


def run_body_generate_close(runtime: WorkerRuntime, job_id: int, session_id: str) -> dict[str, Any]:
    return {"closed": runtime.generation.close(job_id, session_id)}
