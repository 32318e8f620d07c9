"""Real Celery worker processes on real Redis: the step protocol end to end, SIGKILL and resume.

The workers use Redis database 14 (the tests' own; conftest's redis_url host) so their queues never mix
with other suites; each test uses a fresh job id and checkpoint directory.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from flglm.contracts.blob_store import RedisBlobStore
from flglm.contracts.dispatch import CeleryDispatcher
from flglm.contracts.job_spec import publish_job_spec
from flglm.contracts.tasks import REPLICA_COUNTERS, ROUND_END, route_step_message
from flglm.protocol import ParallelMode
from flglm.step_protocol import MessageRef, WorkerJobSpec, replica_queue
from flglm.wire.keys import ClientKeyPair, generate_private_key, save_private_key
from tests.worker.step_clients import SimulatedClient, client_batch, make_spec, reference_sequential_losses
from worker.checkpoints import latest_snapshot, replica_dir

pytestmark = pytest.mark.redis
CLIENT_IDS = [11, 12, 13]
REPO = Path(__file__).resolve().parents[2]
RESULT_WAIT_S = 15.0


def clear_worker_queues(redis_url: str) -> str:
    """The workers' Redis URL (database 14, theirs alone), emptied: an interrupted or earlier run leaves
    queues and 30-day job specs there, and a stale spec of the same job id carries other client keys."""
    url = redis_url.rsplit("/", 1)[0] + "/14"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="module")
def worker_redis_url(redis_url: str) -> str:
    return clear_worker_queues(redis_url)


class WorkerProcesses:
    """Starts `flglm worker` subprocesses (Celery, solo pool) and kills them like an operator would not."""

    def __init__(self, redis_url: str, key_file: Path, log_dir: Path) -> None:
        self.redis_url, self.key_file, self.log_dir = redis_url, key_file, log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.run_id = random.randrange(10**9)

    def log_path(self, index: int) -> Path:
        return self.log_dir / f"worker-{index}.log"

    def node_name(self, index: int) -> str:
        return f"test-{index}-{self.run_id}@{socket.gethostname()}"

    def start(
        self, *replicas: int | str, options: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`flglm worker --replica R ...` (R a slot or 'auto') with `options`, node name `node_name(i)`."""
        worker_env = dict(os.environ)
        worker_env.update(
            FLGLM_REDIS_URL=self.redis_url,
            FLGLM_SERVER_KEY_FILE=str(self.key_file),
            FLGLM_BROKER_VISIBILITY_TIMEOUT_S="5",  # redeliver a dead worker's task quickly
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
            **(env or {}),
        )
        args = [
            sys.executable,
            "-m",
            "apps.cli.main",
            "worker",
            "--loglevel",
            "warning",
            "--hostname",
            self.node_name(len(self.processes)),
            *options,
        ]
        for replica in replicas:
            args += ["--replica", str(replica)]
        if replicas and replicas[0] not in (0, "auto", "none"):
            args.append("--no-default-queue")
        log = open(self.log_path(len(self.processes)), "wb")  # noqa: SIM115
        process = subprocess.Popen(args, env=worker_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)


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
