"""The `flglm.admit_upload` task: check an agent's upload *before* the backend stores it (→ a clear 4xx).

The backend stages the upload under a one-off key and queues this task on `flglm.admission` (its own queue,
so it never waits behind a forward pass); the task authenticates the envelope, checks its header against the
message's address and its tensors against the job (dtype, shape, hidden size, limits) and refuses replays
with the `SequenceGuard` every worker shares (Redis). Only then does the backend store the message under
its own key, so a hostile upload leaves nothing behind. The replica opens the message again when its step
runs: authentication under AEAD is decryption, and the plaintext never goes back to the blob store.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.contracts.job_spec import read_job_spec
from flglm.contracts.refusals import (
    ForeignClient,
    MissingMessage,
    WrongDirection,
)
from flglm.models import load_config
from flglm.step_messages import (
    FORWARD_DIRECTIONS,
    PayloadLimits,
    open_activations,
    open_adapters,
    open_hidden,
    rejection_from_wire,
)
from flglm.step_protocol import MessageDirection, MessageRef, WorkerJobSpec
from flglm.wire.codec import parse_wire_dtype
from flglm.wire.directions import Direction
from flglm.wire.errors import ReplayError, WireError
from flglm.wire.keys import derive_channel_keys, public_key_from_b64
from flglm.wire.sequence import SequencedHeader, SequenceGuard
from worker.runtime import WorkerRuntime

UPLOAD_DIRECTIONS = (
    MessageDirection.activations,
    MessageDirection.gradients,
    MessageDirection.adapters_up,
    MessageDirection.eval_activations,
)


@lru_cache(maxsize=64)
def model_hidden_size(model_ref: str) -> int:
    """Hidden size of a model from its config alone (no weights are read)."""
    config = load_config(model_ref)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"{model_ref}: its config has no hidden size")


def payload_limits(spec: WorkerJobSpec) -> PayloadLimits:
    wire_dtype = parse_wire_dtype(spec.wire_dtype) or torch.float32
    return PayloadLimits(wire_dtype, model_hidden_size(spec.model_ref), spec.max_batch_size, spec.max_seq_len)


def admit_step_upload(
    spec: WorkerJobSpec,
    server_private_key: X25519PrivateKey,
    ref: MessageRef,
    blob: bytes,
    replay_guard: SequenceGuard | None = None,
) -> None:
    """Raise the typed refusal (`StepRejected`, with `http_status`) unless `blob` is a valid upload for
    `ref`: a client of the job, an authentic envelope for exactly this address, the job's dtype and shape."""
    if ref.job_id != spec.job_id:
        raise ForeignClient(f"message of job {ref.job_id} sent to job {spec.job_id}")
    if ref.client_id not in spec.client_ids():
        raise ForeignClient(f"client {ref.client_id} is not a client of job {spec.job_id}")
    if ref.direction not in UPLOAD_DIRECTIONS:
        raise WrongDirection(f"agents cannot upload {ref.direction.value} messages")
    keys = derive_channel_keys(
        server_private_key,
        public_key_from_b64(spec.public_key_of(ref.client_id)),
        str(spec.job_id),
        str(ref.client_id),
    )
    limits = payload_limits(spec)
    try:
        if ref.direction in FORWARD_DIRECTIONS:  # training or eval h0: the same checks
            open_activations(keys, ref, blob, limits, replay_guard)
        elif ref.direction is MessageDirection.gradients:
            open_hidden(keys, ref, blob, limits, replay_guard=replay_guard)
        else:
            open_adapters(keys, ref, blob, replay_guard=replay_guard)
    except WireError as exc:
        raise rejection_from_wire(exc) from None


class RedisSequenceGuard:
    """`SequenceGuard` on Redis: one atomic compare-and-set per message, shared by every process.

    Sequences are compared as zero-padded decimal strings, because Lua numbers are doubles and would
    round sequence numbers above 2**53. With a `digest` (admission passes the upload's SHA-256), the last
    accepted sequence is kept with it, and the same sequence with the same digest is accepted again: the
    identical retry of an upload whose admission ran but whose storing did not (the backend died in between)
    is the same authenticated message, not a replay.
    """

    _SCRIPT = """
    local last = redis.call('GET', KEYS[1])
    if last then
      local sequence = string.sub(last, 1, 20)
      if sequence > ARGV[1] then return 0 end
      if sequence == ARGV[1] then
        if ARGV[3] ~= '' and string.sub(last, 22) == ARGV[3] then return 1 end
        return 0
      end
    end
    redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[3], 'EX', ARGV[2])
    return 1
    """

    def __init__(self, client: Any, namespace: str = "flglm:seq:", ttl_s: int = 90 * 86400) -> None:
        self._redis = client
        self._namespace = namespace
        self._ttl_s = ttl_s
        self._compare_and_set = client.register_script(self._SCRIPT)

    def accept(self, header: SequencedHeader, digest: str = "") -> None:
        key = f"{self._namespace}{header.job_id}:{header.client_id}:{Direction(header.direction).value}"
        if not self._compare_and_set(keys=[key], args=[f"{header.sequence:020d}", self._ttl_s, digest]):
            raise ReplayError(
                f"{header.direction} message {header.sequence} of job {header.job_id!r}, client "
                f"{header.client_id!r} is not after the last accepted one: replayed or reordered"
            )


def run_admit_upload(
    runtime: WorkerRuntime, job_id: int, message: dict[str, Any], staging_key: str
) -> dict[str, Any]:
    """Task: admit the upload staged at `staging_key` for `message` (the backend then stores it under the
    message's own key, or deletes the staged copy and answers 4xx). Runs on the `flglm.admission` queue."""
    ref = MessageRef.model_validate(message)
    spec = read_job_spec(runtime.store, job_id)
    blob = runtime.store.get(staging_key)
    if blob is None:
        raise MissingMessage(f"nothing staged at {staging_key}")
    guard = IdenticalRetryGuard(runtime.upload_guard, hashlib.sha256(blob).hexdigest())
    admit_step_upload(spec, runtime.server_key_for(spec), ref, blob, guard)
    return {"status": "admitted"}


class IdenticalRetryGuard:
    """The upload guard, told the upload's digest: an identical retry of an admitted sequence passes."""

    def __init__(self, guard: SequenceGuard, digest: str) -> None:
        self._guard, self._digest = guard, digest

    def accept(self, header: SequencedHeader, digest: str = "") -> None:
        self._guard.accept(header, digest=digest or self._digest)
