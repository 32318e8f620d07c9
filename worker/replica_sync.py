"""Hierarchical FedAvg between the replicas of one job (server_hierarchical): when, and the exchange itself.

Every `server_fedavg_every` applied steps each replica puts its server adapters at
`server-state:<job>:<sync index>:<replica>` (write-once), waits up to `exchange_timeout_s` for every peer's,
and loads their average weighted by each replica's number of clients. A peer that misses the exchange
leaves every replica that waited on it with its own adapters.
"""

from __future__ import annotations

import logging
import time

from torch import nn

from flglm.adapters import fedavg, load_trainable_state_dict, trainable_state_dict
from flglm.contracts.blob_store import BlobStore
from flglm.protocol import ParallelMode
from flglm.step_protocol import WorkerJobSpec
from flglm.wire.codec import decode_tensors, encode_tensors

log = logging.getLogger(__name__)


def server_state_key(job_id: int, sync_index: int, replica: int) -> str:
    return f"server-state:{job_id}:{sync_index}:{replica}"


def sync_due(spec: WorkerJobSpec, server_steps: int) -> bool:
    """Whether the replicas average their adapters after applied step `server_steps`."""
    return (
        spec.parallel_mode is ParallelMode.server_hierarchical
        and spec.replicas > 1
        and server_steps % spec.server_fedavg_every == 0
    )


def average_with_peers(
    body: nn.Module, store: BlobStore, spec: WorkerJobSpec, replica: int, sync_index: int
) -> None:
    """FedAvg of the server adapters of all replicas, weighted by their clients, loaded into `body`."""
    own = trainable_state_dict(body)
    key = server_state_key(spec.job_id, sync_index, replica)
    store.put_if_absent(key, encode_tensors({k: v.cpu() for k, v in own.items()}), spec.blob_ttl_s)
    states, weights = [], []
    deadline = time.monotonic() + spec.exchange_timeout_s
    for peer in range(spec.replicas):
        data = store.wait_for(
            server_state_key(spec.job_id, sync_index, peer), max(deadline - time.monotonic(), 0.0)
        )
        if data is None:
            log.warning(
                "replica %s: replica %s missed sync %s; keeping local adapters", replica, peer, sync_index
            )
            return
        states.append(decode_tensors(data))
        weights.append(float(len(spec.replica_clients(peer))))
    load_trainable_state_dict(body, fedavg(states, weights))
