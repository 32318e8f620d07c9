"""One contract for both executors: the in-process one (embedded default) and Celery on real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flglm.adapters import trainable_state_dict
from flglm.contracts import refusals as errors
from flglm.contracts.tasks import CLIENT_FEDAVG, REPLICA_COUNTERS, route_step_message
from flglm.step_messages import seal_adapters
from flglm.step_protocol import DEFAULT_QUEUE, MessageDirection, MessageRef, replica_queue
from tests.support.celery_harness import CeleryHarness
from tests.support.engine_harness import Harness
from tests.support.step_clients import CLIENT_IDS, client_batch, reference_sequential_losses


# Celery starts a worker process (imports torch, transformers, peft): seconds on a busy machine, so slow.
@pytest.fixture(params=["inprocess", pytest.param("celery", marks=[pytest.mark.slow, pytest.mark.redis])])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "inprocess":
        inprocess = Harness(tmp_path, checkpoint_every=4)
        yield inprocess
        inprocess.executor.close()
        return
    celery = CeleryHarness(tmp_path, request.getfixturevalue("worker_redis_url"), checkpoint_every=4)
    celery.workers.start(0)
    yield celery
    celery.close()


def _step(h: Any, cid: int, step: int) -> tuple[float, list[str]]:
    client, batch = h.clients[cid], client_batch(cid, step + 100)
    fwd = client.upload_forward(h.store, h.spec, h.server_public, 1, step, batch)
    statuses = [h.executor.submit(*route_step_message(h.spec, fwd)).get(timeout_s=120)["status"]]
    statuses.append(h.executor.submit(*route_step_message(h.spec, fwd)).get(timeout_s=120)["status"])  # again
    loss, grad_ref, _ = client.upload_gradients(h.store, h.spec, h.server_public, fwd, batch)
    statuses.append(h.executor.submit(*route_step_message(h.spec, grad_ref)).get(timeout_s=120)["status"])
    client.finish(h.store, h.spec, h.server_public, grad_ref)
    return loss, statuses


def test_executor_contract(harness: Any) -> None:
    h = harness
    losses = []
    for step in range(2):
        for cid in CLIENT_IDS:
            loss, statuses = _step(h, cid, step)
            assert statuses == ["done", "done", "done"]  # a repeated task is a no-op with the same answer
            losses.append(loss)
    reference = reference_sequential_losses(h.spec, CLIENT_IDS, steps=2)
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-4
    counters = h.executor.submit(
        REPLICA_COUNTERS, {"job_id": h.spec.job_id, "replica": 0}, replica_queue(0)
    ).get(timeout_s=60)
    assert counters["server_steps"] == 6

    # A refusal comes back as the same typed error from either executor; the worker carries on.
    missing = MessageRef(
        job_id=h.spec.job_id,
        round_number=1,
        step=5,
        client_id=11,
        direction=MessageDirection.activations,
        sequence=10**6,
    )
    with pytest.raises(errors.MissingMessage):
        h.executor.submit(*route_step_message(h.spec, missing)).get(timeout_s=60)
    unknown = {
        "job_id": 1,
        "replica": 0,
        "message": missing.model_copy(update={"job_id": 1}).model_dump(mode="json"),
    }
    with pytest.raises(errors.UnknownJob):
        h.executor.submit("flglm.server_forward", unknown, replica_queue(0)).get(timeout_s=60)

    # Client FedAvg runs on the default queue and answers every uploader.
    uploads = []
    for client in h.clients.values():
        ref = client.ref(h.spec, 1, 0, MessageDirection.adapters_up)
        state = trainable_state_dict(client.trainer.front)
        h.store.put_if_absent(
            ref.blob_key(), seal_adapters(client.keys(h.spec, h.server_public), ref, state), 60
        )
        uploads.append(ref.model_dump(mode="json"))
    kwargs = {"job_id": h.spec.job_id, "round_number": 1, "uploads": uploads, "example_counts": {"11": 1}}
    result = h.executor.submit(CLIENT_FEDAVG, kwargs, DEFAULT_QUEUE).get(timeout_s=60)
    assert result["status"] == "done" and sorted(result["clients"]) == CLIENT_IDS
    for upload in uploads:
        assert h.store.get(MessageRef.model_validate(upload).result_ref().blob_key()) is not None


def test_the_settings_pick_the_dispatcher_and_only_the_app_layer_wires_the_in_process_one(
    redis_url: str, tmp_path: Path
) -> None:
    from apps.server import inprocess_executor
    from backend.settings import Settings
    from backend.steps.relay import NoInProcessDispatcher, step_relay_from_settings
    from flglm.contracts.blob_store import InMemoryBlobStore, RedisBlobStore
    from flglm.contracts.dispatch import CeleryDispatcher
    from flglm.wire.keys import generate_private_key
    from worker.executor import InProcessExecutor

    key = generate_private_key()
    settings = Settings(data_dir=tmp_path, executor="inprocess")
    runtime = step_relay_from_settings(settings, key, inprocess_executor)
    assert isinstance(runtime.dispatcher, InProcessExecutor) and isinstance(runtime.store, InMemoryBlobStore)
    runtime.close()
    with pytest.raises(NoInProcessDispatcher, match="create_server_app"):
        step_relay_from_settings(settings, key)
    celery = step_relay_from_settings(
        settings.model_copy(update={"executor": "celery", "redis_url": redis_url}), key
    )
    assert isinstance(celery.dispatcher, CeleryDispatcher) and isinstance(celery.store, RedisBlobStore)
    celery.close()
