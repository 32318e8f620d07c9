"""Three simulated data owners driving real `flglm worker` processes through Redis (blob store and broker)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from flglm.contracts.blob_store import RedisBlobStore
from flglm.contracts.dispatch import CeleryDispatcher
from flglm.contracts.job_spec import publish_job_spec
from flglm.contracts.tasks import route_step_message
from flglm.step_protocol import MessageRef, WorkerJobSpec, replica_queue
from flglm.wire.keys import ClientKeyPair, generate_private_key, save_private_key
from tests.support.celery_workers import WorkerProcesses
from tests.support.step_clients import CLIENT_IDS, SimulatedClient, client_batch, make_spec

RESULT_WAIT_S = 15.0


class CeleryHarness:
    """Three simulated agents talking to real workers through Redis (blob store + Celery broker)."""

    def __init__(self, tmp_path: Path, redis_url: str, **spec_overrides: Any) -> None:
        self.store = RedisBlobStore.from_url(redis_url)
        server_key = generate_private_key()
        key_file = tmp_path / "server.key"
        save_private_key(server_key, key_file)
        self.server_public = server_key.public_key()
        self.clients = {cid: SimulatedClient(cid, ClientKeyPair.generate()) for cid in CLIENT_IDS}
        self.spec: WorkerJobSpec = make_spec(
            random.randrange(10**6, 10**9),
            [(cid, c.keypair) for cid, c in self.clients.items()],
            tmp_path / "ckpt",
            **spec_overrides,
        )
        publish_job_spec(self.store, self.spec)
        # The dispatcher the control plane uses in production: the contract suite runs on it.
        self.executor = CeleryDispatcher(redis_url)
        self.app = self.executor.app
        self.workers = WorkerProcesses(redis_url, key_file, tmp_path)
        self.attempts: dict[tuple[int, int, int], int] = {}

    def send(self, ref: MessageRef) -> None:
        name, kwargs, queue = route_step_message(self.spec, ref)
        self.executor.submit(name, kwargs, queue)

    def agent_step(
        self, cid: int, round_number: int, step: int, before_backward: Any = None, after_backward: Any = None
    ) -> float:
        """What an agent does for one step, retrying from the forward when a result does not come."""
        client, batch = self.clients[cid], client_batch(cid, step + 100 * round_number)
        for attempt in range(1, 7):
            self.attempts[(cid, round_number, step)] = attempt
            fwd = client.upload_forward(self.store, self.spec, self.server_public, round_number, step, batch)
            self.send(fwd)
            if self.store.wait_for(fwd.result_ref().blob_key(), RESULT_WAIT_S) is None:
                continue
            if before_backward is not None:
                before_backward()
                before_backward = None
            loss, grad_ref, _ = client.upload_gradients(self.store, self.spec, self.server_public, fwd, batch)
            self.send(grad_ref)
            if after_backward is not None:
                after_backward()
                after_backward = None
            if self.store.wait_for(grad_ref.result_ref().blob_key(), RESULT_WAIT_S) is None:
                continue
            client.finish(self.store, self.spec, self.server_public, grad_ref)
            return loss
        raise AssertionError(f"client {cid} could not complete round {round_number} step {step}")

    def task(self, name: str, replica: int, **kwargs: Any) -> dict[str, Any]:
        kwargs = {"job_id": self.spec.job_id, "replica": replica, **kwargs}
        return self.executor.submit(name, kwargs, replica_queue(replica)).get(timeout_s=120)

    def close(self) -> None:
        self.workers.stop_all()
        self.app.close()
