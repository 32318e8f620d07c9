"""Real Celery worker processes on real Redis: the step protocol end to end, SIGKILL and resume.

The workers use Redis database 14 (the tests' own; conftest's redis_url host) so their queues never mix
with other suites; each test uses a fresh job id and checkpoint directory.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flglm.contracts.tasks import REPLICA_COUNTERS, ROUND_END
from flglm.protocol import ParallelMode
from tests.support.celery_harness import CeleryHarness
from tests.support.step_clients import CLIENT_IDS, client_batch, reference_sequential_losses
from worker.checkpoints import latest_snapshot, replica_dir


@pytest.fixture
def make_harness(tmp_path: Path, worker_redis_url: str) -> Iterator[Any]:
    made: list[CeleryHarness] = []

    def make(**overrides: Any) -> CeleryHarness:
        harness = CeleryHarness(tmp_path, worker_redis_url, **overrides)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.mark.slow
def test_sigkill_mid_round_then_new_worker_applies_every_step_exactly_once(make_harness: Any) -> None:
    h = make_harness(checkpoint_every=4)
    first = h.workers.start(0)
    losses = [h.agent_step(cid, 1, step) for step in range(2) for cid in CLIENT_IDS]  # 6 steps, ckpt at 4

    # Mid-step: client 11's forward of step 2 ran (its graph is in the worker), then the worker dies.
    second: list[subprocess.Popen[bytes]] = []

    def kill_and_replace() -> None:
        h.workers.kill(first)
        second.append(h.workers.start(0))

    losses.append(h.agent_step(11, 1, 2, before_backward=kill_and_replace))
    assert h.attempts[(11, 1, 2)] >= 2  # the graph died with the worker: the agent retried the forward

    # Kill again the moment client 12's backward task is sent: queued, running or done, the step must
    # end up applied exactly once (journal replay and the agent's retry from the forward).
    def kill_during_backward() -> None:
        h.workers.kill(second[0])
        h.workers.start(0)

    losses.append(h.agent_step(12, 1, 2, after_backward=kill_during_backward))
    losses.append(h.agent_step(13, 1, 2))
    assert h.task(ROUND_END, 0, round_number=1)["server_steps"] == 9

    reference = reference_sequential_losses(h.spec, CLIENT_IDS, steps=3)
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-4  # nothing lost or doubled
    snapshot = latest_snapshot(replica_dir(h.spec.checkpoint_dir, 0))
    assert snapshot is not None and snapshot.server_steps == 9
    expected = sorted(f"1:{step}:{cid}" for step in range(3) for cid in CLIENT_IDS)
    assert snapshot.applied == expected
    counters = h.task(REPLICA_COUNTERS, 0)
    assert counters == {"server_steps": 9, "applied": expected}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [ParallelMode.client_batch, ParallelMode.server_hierarchical])
def test_parallel_modes_complete_with_celery_workers(make_harness: Any, mode: ParallelMode) -> None:
    replicas = 2 if mode is ParallelMode.server_hierarchical else 1
    h = make_harness(parallel_mode=mode, replicas=replicas, server_fedavg_every=1, batch_window_s=5.0)
    for replica in range(replicas):
        h.workers.start(replica)
    for step in range(2):
        forwards, uploads = {}, {}
        for cid, client in h.clients.items():
            forwards[cid] = client.upload_forward(
                h.store, h.spec, h.server_public, 1, step, client_batch(cid, step + 100)
            )
            h.send(forwards[cid])
        for cid, client in h.clients.items():
            uploads[cid] = client.upload_gradients(
                h.store, h.spec, h.server_public, forwards[cid], client_batch(cid, step + 100)
            )
            h.send(uploads[cid][1])
        for cid, client in h.clients.items():
            client.finish(h.store, h.spec, h.server_public, uploads[cid][1])
    counters = [h.task(REPLICA_COUNTERS, r) for r in range(replicas)]
    assert [c["server_steps"] for c in counters] == [2] * replicas  # one step per batch, not per client
    applied = sorted(key for c in counters for key in c["applied"])
    assert applied == sorted(f"1:{step}:{cid}" for step in range(2) for cid in CLIENT_IDS)
    # Round end checkpoints every replica; hierarchical replicas hold the same averaged adapters.
    snapshots = []
    for replica in range(replicas):
        assert h.task(ROUND_END, replica, round_number=1)["server_steps"] == 2
        snapshot = latest_snapshot(replica_dir(h.spec.checkpoint_dir, replica))
        assert snapshot is not None and snapshot.server_steps == 2
        snapshots.append(snapshot)
    if replicas == 2:
        first, second = snapshots[0].adapters, snapshots[1].adapters
        assert all(torch.equal(first[k], second[k]) for k in first)
