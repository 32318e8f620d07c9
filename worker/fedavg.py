"""End-of-round FedAvg of client-block adapters, weighted by example counts; sealed for each client."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file, save

from flglm.adapters import fedavg
from flglm.contracts.artifacts import client_adapters_path
from flglm.contracts.blob_store import PutOutcome
from flglm.contracts.job_spec import read_job_spec
from flglm.contracts.refusals import ForeignClient, MissingMessage, ReplicaMisrouted
from flglm.step_messages import open_adapters, rejection_from_wire, seal_adapters
from flglm.step_protocol import MAX_EXAMPLE_COUNT, MessageDirection, MessageRef
from flglm.wire.atomic_file import write_file_atomically
from flglm.wire.errors import WireError
from flglm.wire.keys import ChannelKeys, derive_channel_keys, public_key_from_b64
from worker.runtime import WorkerRuntime


def run_client_fedavg(
    runtime: WorkerRuntime,
    job_id: int,
    round_number: int,
    uploads: list[dict[str, Any]],
    example_counts: dict[str, int],
) -> dict[str, Any]:
    """Average the adapters_up uploads of one round and publish one adapters_down per uploading client.

    Idempotent: a re-run publishes the average saved by the first run (the same one a recomputation gives:
    deterministic, float64 accumulation), so it needs no uploads when the blob store lost them and the
    results with them (a Redis restart); the first published result of each client stands.
    """
    spec = read_job_spec(runtime.store, job_id)
    refs = [MessageRef.model_validate(u) for u in uploads]
    if not refs:
        raise ValueError("client FedAvg needs at least one upload")
    for ref in refs:
        if ref.job_id != job_id or ref.round_number != round_number:
            raise ReplicaMisrouted(
                f"upload {ref.blob_key()} does not belong to job {job_id} round {round_number}"
            )
        if ref.direction is not MessageDirection.adapters_up:
            raise ReplicaMisrouted(f"{ref.blob_key()} is not an adapters_up message")
        if ref.client_id not in spec.client_ids():
            raise ForeignClient(f"client {ref.client_id} is not a client of job {job_id}")
    if len({ref.client_id for ref in refs}) != len(refs):
        raise ValueError("client FedAvg got two uploads from one client")
    if all(runtime.store.get(ref.result_ref().blob_key()) is not None for ref in refs):
        return {"status": "done", "clients": [ref.client_id for ref in refs]}
    server_key = runtime.server_key_for(spec)
    keys = {
        ref.client_id: derive_channel_keys(
            server_key,
            public_key_from_b64(spec.public_key_of(ref.client_id)),
            str(job_id),
            str(ref.client_id),
        )
        for ref in refs
    }
    averaged = saved_global_client_adapters(spec.checkpoint_dir, round_number)
    if averaged is None:
        averaged = _average_uploads(runtime, refs, keys, example_counts)
        save_global_client_adapters(spec.checkpoint_dir, round_number, averaged)
    published = []
    for ref in refs:
        result = ref.result_ref()
        outcome = runtime.store.put_if_absent(
            result.blob_key(), seal_adapters(keys[ref.client_id], result, averaged), spec.blob_ttl_s
        )
        if outcome is PutOutcome.stored:
            published.append(ref.client_id)
    return {"status": "done", "clients": [ref.client_id for ref in refs], "published": published}


def _average_uploads(
    runtime: WorkerRuntime,
    refs: list[MessageRef],
    keys: dict[int, ChannelKeys],
    example_counts: dict[str, int],
) -> dict[str, torch.Tensor]:
    """The example-weighted average of the clients' uploaded adapters (opened and checked)."""
    states: list[dict[str, torch.Tensor]] = []
    weights: list[float] = []
    for ref in refs:
        blob = runtime.store.get(ref.blob_key())
        if blob is None:
            raise MissingMessage(f"no adapter upload at {ref.blob_key()}")
        try:
            expected = None if not states else {n: (t.dtype, tuple(t.shape)) for n, t in states[0].items()}
            states.append(open_adapters(keys[ref.client_id], ref, blob, expected=expected))
        except WireError as exc:
            raise rejection_from_wire(exc) from None
        # Bounded again here: a count that reached the store some other way must not overflow the sum.
        weights.append(float(min(max(int(example_counts.get(str(ref.client_id), 0)), 0), MAX_EXAMPLE_COUNT)))
    if sum(weights) <= 0:
        weights = [1.0] * len(states)  # nobody disclosed a count: a plain average
    return fedavg(states, weights)


def saved_global_client_adapters(checkpoint_dir: str, round_number: int) -> dict[str, torch.Tensor] | None:
    """The round's average as `save_global_client_adapters` wrote it; None before the round's FedAvg ran."""
    path = client_adapters_path(checkpoint_dir, round_number)
    return load_file(path) if path.is_file() else None


def save_global_client_adapters(
    checkpoint_dir: str, round_number: int, averaged: dict[str, torch.Tensor]
) -> None:
    """Keep the round's plaintext average next to the server checkpoints, for the operator's export.

    Written before any client's copy is published, so a published round always has its file; a re-run
    rewrites the same bytes. Readable by whoever reads the checkpoint volume (the operator), by design.
    """
    path = client_adapters_path(checkpoint_dir, round_number)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in averaged.items()}
    metadata = {"format": "flglm-client-adapters/1", "round": str(round_number)}
    write_file_atomically(path, save(tensors, metadata=metadata), mode=0o640)
