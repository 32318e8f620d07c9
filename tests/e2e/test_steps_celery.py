"""The step protocol through HTTPS with real Celery worker processes on real Redis (slow).

The backend runs with `FLGLM_EXECUTOR=celery` semantics (Redis blob store, tasks by name on the broker);
`flglm worker` subprocesses serve the job. Redis database 12 is this module's own and is emptied first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from backend.settings import Settings
from backend.steps.relay import StepRelay
from flglm.agent_step import run_client_eval_forward
from flglm.contracts.refusals import JobKeyDeleted
from flglm.contracts.tasks import REPLICA_COUNTERS
from flglm.step_client import StepClient
from flglm.step_protocol import MessageDirection, MessageRef, UploadReceipt, replica_queue
from tests.support.celery_workers import WorkerProcesses
from tests.support.control_plane import Api, LiveServer
from tests.support.step_agents import (
    ROUNDS,
    STEPS,
    DataOwner,
    assert_job_has_its_own_key,
    enroll_owner,
    published_spec,
    reference_sequential_losses,
    server_public_key,
    start_job,
    train_sequentially,
)
from tests.support.step_clients import client_batch

pytestmark = pytest.mark.slow
EXAMPLE_COUNTS = (10, 30, 60)


def _celery_redis_url(redis_url: str) -> str:
    url = redis_url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url)
    client.flushdb()  # this module's own database: queues, blobs, sequences and results of earlier runs
    client.close()
    return url


@pytest.fixture
def settings_overrides(redis_url: str) -> dict[str, Any]:
    return {"executor": "celery", "redis_url": _celery_redis_url(redis_url)}


@pytest.fixture
def workers(settings: Settings, tmp_path: Path, live_server: LiveServer) -> Iterator[WorkerProcesses]:
    """`flglm worker` processes sharing the backend's server key (the app created it on start)."""
    processes = WorkerProcesses(settings.redis_url, settings.resolved_server_key_file(), tmp_path)
    yield processes
    processes.stop_all()


def replica_counters(runtime: StepRelay, job_id: int, load: bool = True) -> dict[str, Any]:
    kwargs = {"job_id": job_id, "replica": 0, "load": load}
    return runtime.dispatcher.submit(REPLICA_COUNTERS, kwargs, replica_queue(0)).get(60)


def assert_losses_match_reference(runtime: StepRelay, owners: list[DataOwner], job_id: int) -> None:
    expected = reference_sequential_losses(published_spec(runtime, job_id), owners)
    for owner, losses in zip(owners, expected, strict=True):
        assert len(owner.losses) == ROUNDS * STEPS
        assert owner.losses == pytest.approx(losses, abs=1e-4)


class KillWorkerBeforeGradients(StepClient):
    """An agent's client during which the worker dies: the first gradients upload of the chosen step
    happens only after the worker that ran its forward (and holds its graph) was SIGKILLed and replaced."""

    def __init__(self, *args: Any, workers: WorkerProcesses, at: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workers, self.at, self.killed = workers, at, False

    def upload(self, ref: MessageRef, sealed: bytes) -> UploadReceipt:
        if (
            not self.killed
            and ref.direction is MessageDirection.gradients
            and (ref.round_number, ref.step) == self.at
        ):
            self.killed = True
            self.workers.kill(self.workers.processes[-1])
            self.workers.start(0)
        return super().upload(ref, sealed)


def test_celery_workers_serve_a_job_over_https_through_a_sigkill_applying_every_step_once(
    live_server: LiveServer, api: Api, workers: WorkerProcesses
) -> None:
    workers.start(0)
    owners = [enroll_owner(api, f"owner-{i}", EXAMPLE_COUNTS[i]) for i in range(3)]
    job_id = start_job(api, owners, "sequential")
    key_file = assert_job_has_its_own_key(live_server, api, owners[0], job_id)  # the workers load it
    victim = owners[1]
    victim.make_client = lambda live, credential: KillWorkerBeforeGradients(
        live.base_url, credential, live.tls.ca_cert, workers=workers, at=(1, 1), max_retries=2
    )
    train_sequentially(api, live_server, owners, job_id)  # one client after another: the reference order
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    assert len(workers.processes) == 2 and workers.processes[0].returncode is not None
    runtime: StepRelay = live_server.app.state.step_relay
    # The job's end queued `flglm.release_job` behind the round-end checkpoint: the worker let go of it.
    assert replica_counters(runtime, job_id, load=False) == {"loaded": False}
    # The new worker resumed from the checkpoint + journal, the agent retried the lost step from its
    # forward: the same losses as the uninterrupted reference, and one server step per client step.
    assert_losses_match_reference(runtime, owners, job_id)
    counters = replica_counters(runtime, job_id)
    assert counters["server_steps"] == len(owners) * ROUNDS * STEPS
    assert len(counters["applied"]) == len(owners) * ROUNDS * STEPS
    assert victim.attempts == [1, 2, 1, 1]  # only the step whose graph died with the worker ran twice
    assert all(attempts == [1] * ROUNDS * STEPS for attempts in (owners[0].attempts, owners[2].attempts))
    # An eval forward of the completed job's last round through the Celery worker (the counters above
    # reloaded the released replica from its round-end checkpoint): logits, no server step.
    owner = owners[0]
    channel = owner.channel(live_server, job_id, server_public_key(api, owner, job_id))
    batch = client_batch(owner.client_id, 7)
    logits = run_client_eval_forward(
        owner.trainer, channel, ROUNDS, 0, batch["input_ids"], batch["attention_mask"]
    )  # (batch, seq, vocab)
    assert logits.shape[:2] == batch["input_ids"].shape and bool(logits.isfinite().all())
    assert replica_counters(runtime, job_id) == counters
    channel.client.close()
    # The backend deleted the job's key (retention after its end): the worker refuses the job's replica
    # with a clear 410 instead of serving it from memory, and goes on serving other tasks.
    key_file.unlink()
    with pytest.raises(JobKeyDeleted):
        replica_counters(runtime, job_id)
    assert replica_counters(runtime, job_id, load=False) == {"loaded": False}
