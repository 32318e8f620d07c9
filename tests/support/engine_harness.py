"""The worker engine in this process: three simulated data owners, a blob store and an in-process executor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flglm.contracts.blob_store import InMemoryBlobStore
from flglm.contracts.job_spec import publish_job_spec
from flglm.contracts.tasks import REPLICA_COUNTERS, route_step_message
from flglm.step_protocol import MessageRef, replica_queue
from flglm.wire.keys import ClientKeyPair, generate_private_key
from tests.support.step_clients import CLIENT_IDS, SimulatedClient, client_batch, make_spec
from worker.executor import InProcessExecutor
from worker.replica import ServerReplica


class Harness:
    """Three simulated clients, a blob store and an in-process executor serving one job."""

    def __init__(self, tmp_path: Path, store: InMemoryBlobStore | None = None, **spec_overrides: Any) -> None:
        self.store = store or InMemoryBlobStore()
        self.server_key = generate_private_key()
        self.server_public = self.server_key.public_key()
        self.clients = {cid: SimulatedClient(cid, ClientKeyPair.generate()) for cid in CLIENT_IDS}
        self.spec = make_spec(
            7, [(cid, c.keypair) for cid, c in self.clients.items()], tmp_path / "ckpt", **spec_overrides
        )
        publish_job_spec(self.store, self.spec)
        self.executor = InProcessExecutor(self.store, self.server_key)

    def send(self, ref: MessageRef) -> dict[str, Any]:
        name, kwargs, queue = route_step_message(self.spec, ref)
        return self.executor.submit(name, kwargs, queue).get(timeout_s=60)

    def sequential_step(self, round_number: int, step: int) -> list[float]:
        losses = []
        for cid, client in self.clients.items():
            batch = client_batch(cid, step + 100 * round_number)
            fwd = client.upload_forward(self.store, self.spec, self.server_public, round_number, step, batch)
            assert self.send(fwd)["status"] == "done"
            loss, grad_ref, _ = client.upload_gradients(self.store, self.spec, self.server_public, fwd, batch)
            assert self.send(grad_ref)["status"] == "done"
            client.finish(self.store, self.spec, self.server_public, grad_ref)
            losses.append(loss)
        return losses

    def replica(self, replica: int = 0) -> ServerReplica:
        return self.executor.runtime.replica(self.spec.job_id, replica)

    def counters(self, replica: int = 0) -> dict[str, Any]:
        kwargs = {"job_id": self.spec.job_id, "replica": replica}
        return self.executor.submit(REPLICA_COUNTERS, kwargs, replica_queue(replica)).get(timeout_s=60)
