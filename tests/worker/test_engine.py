"""The worker engine in-process: sequential equals the split trainer, batching, idempotency, hostility, resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flglm.step_protocol import MessageDirection, WorkerJobSpec, replica_queue
from flglm.wire.keys import ClientKeyPair, generate_private_key
from tests.worker.step_clients import SimulatedClient, client_batch, make_spec, reference_sequential_losses
from worker.blob_store import InMemoryBlobStore
from worker.engine import publish_job_spec
from worker.executor import REPLICA_COUNTERS, InProcessExecutor, route_step_message

CLIENT_IDS = [11, 12, 13]


class Harness:
    """Three simulated clients, a blob store and an in-process executor serving one job."""

    def __init__(self, tmp_path: Path, **spec_overrides: object) -> None:
        self.store = InMemoryBlobStore()
        self.server_key = generate_private_key()
        self.server_public = self.server_key.public_key()
        self.clients = {cid: SimulatedClient(cid, ClientKeyPair.generate()) for cid in CLIENT_IDS}
        self.spec = make_spec(
            7, [(cid, c.keypair) for cid, c in self.clients.items()], tmp_path / "ckpt", **spec_overrides
        )
        publish_job_spec(self.store, self.spec)
        self.executor = InProcessExecutor(self.store, self.server_key)

    def send(self, ref: object) -> dict[str, object]:
        name, kwargs, queue = route_step_message(self.spec, ref)  # type: ignore[arg-type]
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

    def counters(self, replica: int = 0) -> dict[str, object]:
        kwargs = {"job_id": self.spec.job_id, "replica": replica}
        return self.executor.submit(REPLICA_COUNTERS, kwargs, replica_queue(replica)).get(timeout_s=60)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, checkpoint_every=2)
    yield h
    h.executor.close()


def test_sequential_losses_equal_the_in_process_split_trainer(harness: Harness) -> None:
    reference = reference_sequential_losses(harness.spec, CLIENT_IDS, steps=3)
    losses = [loss for step in range(3) for loss in harness.sequential_step(1, step)]
    assert len(losses) == len(reference) == 9
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-4
    assert losses[-3:] != losses[:3]  # training moved the model
    counters = harness.counters()
    assert counters["server_steps"] == 9
    assert len(counters["applied"]) == 9  # type: ignore[arg-type]
