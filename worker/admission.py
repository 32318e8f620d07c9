"""Checks of an agent's upload *before* it is stored, for the backend's step endpoints (→ a clear 4xx).

The backend holds the server key too, so it can authenticate and shape-check a message in the request,
and store nothing when it is hostile; the worker repeats every check when the task runs (defence in
depth, and the only check for tasks that arrive some other way). Pass a `SequenceGuard` shared by all
backend replicas to refuse replays here as well.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.models import load_config
from flglm.step_messages import PayloadLimits, open_activations, open_adapters, open_hidden
from flglm.step_protocol import MessageDirection, MessageRef, WorkerJobSpec
from flglm.wire.codec import parse_wire_dtype
from flglm.wire.errors import WireError
from flglm.wire.keys import derive_channel_keys, public_key_from_b64
from flglm.wire.sequence import SequenceGuard
from worker.errors import ForeignClient, StepRejected, rejection_from_wire

UPLOAD_DIRECTIONS = (MessageDirection.activations, MessageDirection.gradients, MessageDirection.adapters_up)


class WrongDirection(StepRejected):
    """Agents upload activations, gradients and adapters_up only; results are the server's to write."""

    http_status = 400
    code = "wrong_direction"


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
        if ref.direction is MessageDirection.activations:
            open_activations(keys, ref, blob, limits, replay_guard)
        elif ref.direction is MessageDirection.gradients:
            open_hidden(keys, ref, blob, limits, replay_guard=replay_guard)
        else:
            open_adapters(keys, ref, blob, replay_guard=replay_guard)
    except WireError as exc:
        raise rejection_from_wire(exc) from None
