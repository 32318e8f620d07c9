"""The worker engine in-process: sequential == split trainer, batching, idempotency, hostility, resume."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import worker.replica
from flglm.adapters import fedavg, trainable_state_dict
from flglm.contracts import refusals as errors
from flglm.contracts.blob_store import PutOutcome
from flglm.contracts.tasks import CLIENT_FEDAVG, DEFAULT_QUEUE, DROP_CLIENT, route_step_message
from flglm.protocol import ParallelMode
from flglm.step_messages import open_adapters, seal_activations, seal_adapters
from flglm.step_protocol import MessageDirection, MessageRef, replica_queue
from flglm.trainers import ServerSideTrainer, TrainConfig
from flglm.wire.keys import ClientKeyPair
from tests.support.engine_harness import Harness
from tests.support.step_clients import (
    CLIENT_IDS,
    TRAIN,
    SimulatedClient,
    client_batch,
    reference_sequential_losses,
)
from worker.checkpoints import latest_snapshot, replica_dir
from worker.executor import InProcessExecutor
from worker.replica_journal import journal_key
from worker.runtime import load_server_body


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
    assert len(counters["applied"]) == 9


def test_client_batch_gives_the_per_client_gradients_of_one_by_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, parallel_mode=ParallelMode.client_batch)
    try:
        batches = {cid: client_batch(cid, 0) for cid in CLIENT_IDS}
        assert len({b["input_ids"].shape[1] for b in batches.values()}) == 3  # three sequence lengths
        forwards = {
            cid: c.upload_forward(h.store, h.spec, h.server_public, 1, 0, batches[cid])
            for cid, c in h.clients.items()
        }
        statuses = [h.send(forwards[cid])["status"] for cid in CLIENT_IDS]
        assert statuses == ["pending", "pending", "done"]  # the third arrival completes the batch
        uploads = {
            cid: c.upload_gradients(h.store, h.spec, h.server_public, forwards[cid], batches[cid])
            for cid, c in h.clients.items()
        }
        assert [h.send(uploads[cid][1])["status"] for cid in CLIENT_IDS] == ["pending", "pending", "done"]
        batched = {
            cid: c.finish(h.store, h.spec, h.server_public, uploads[cid][1]) for cid, c in h.clients.items()
        }

        one_by_one = ServerSideTrainer(load_server_body(h.spec), TrainConfig(**TRAIN))
        for cid, client in h.clients.items():
            one_by_one.forward(cid, client.last_h0, batches[cid]["attention_mask"])
            alone = one_by_one.backward(cid, uploads[cid][2])
            assert alone.shape == batched[cid].shape
            assert torch.allclose(alone, batched[cid], atol=1e-5, rtol=0), cid
        one_by_one.step()  # one step on the summed gradients, like the batch
        expected = trainable_state_dict(one_by_one.body)
        got = trainable_state_dict(h.replica().trainer.body)  # on the worker device (cuda if any)
        assert max((expected[k] - got[k].cpu()).abs().max().item() for k in expected) <= 1e-5
        assert h.counters()["server_steps"] == 1
    finally:
        h.executor.close()


def test_client_batch_straggler_does_not_block_the_others(tmp_path: Path) -> None:
    h = Harness(tmp_path, parallel_mode=ParallelMode.client_batch, batch_window_s=0.3)
    try:
        present = CLIENT_IDS[:2]  # client 13 never sends its forward
        batches = {cid: client_batch(cid, 0) for cid in present}
        forwards = {
            cid: h.clients[cid].upload_forward(h.store, h.spec, h.server_public, 1, 0, batches[cid])
            for cid in present
        }
        for cid in present:
            h.send(forwards[cid])
        # The window timer runs the batch without the straggler; each client gets its h1.
        uploads = {
            cid: h.clients[cid].upload_gradients(
                h.store, h.spec, h.server_public, forwards[cid], batches[cid]
            )
            for cid in present
        }
        for cid in present:
            h.send(uploads[cid][1])
        for cid in present:
            h.clients[cid].finish(h.store, h.spec, h.server_public, uploads[cid][1])
        assert h.counters()["server_steps"] == 1
        assert h.counters()["applied"] == ["1:0:11", "1:0:12"]
    finally:
        h.executor.close()


def test_repeated_tasks_and_uploads_apply_once(harness: Harness) -> None:
    client = harness.clients[11]
    batch = client_batch(11, 0)
    fwd = client.upload_forward(harness.store, harness.spec, harness.server_public, 1, 0, batch)
    assert harness.store.put_if_absent(fwd.blob_key(), harness.store.get(fwd.blob_key()) or b"", 60) is (
        PutOutcome.identical
    )
    assert harness.send(fwd)["status"] == "done"
    first_h1 = harness.store.get(fwd.result_ref().blob_key())
    assert harness.send(fwd)["status"] == "done"  # the same task again: a no-op
    assert harness.store.get(fwd.result_ref().blob_key()) == first_h1
    _, grad_ref, _ = client.upload_gradients(harness.store, harness.spec, harness.server_public, fwd, batch)
    assert harness.send(grad_ref)["status"] == "done"
    assert harness.send(grad_ref)["status"] == "done"
    assert harness.counters() == {"server_steps": 1, "applied": ["1:0:11"]}


def _hostile_env(harness: Harness) -> tuple[SimulatedClient, dict[str, torch.Tensor]]:
    return harness.clients[11], client_batch(11, 0)


def test_hostile_inputs_are_refused_and_leave_nothing_behind(harness: Harness) -> None:
    client, _ = _hostile_env(harness)
    spec, store, public = harness.spec, harness.store, harness.server_public
    keys = client.keys(spec, public)
    h0 = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.long)

    def upload(ref: MessageRef, blob: bytes) -> MessageRef:
        store.put_if_absent(ref.blob_key(), blob, 60)
        return ref

    def refused(ref: MessageRef, kind: type[errors.StepRejected]) -> None:
        with pytest.raises(kind):
            harness.send(ref)
        assert store.get(ref.result_ref().blob_key()) is None

    ref = client.ref(spec, 1, 0, MessageDirection.activations)
    refused(upload(ref, seal_activations(keys, ref, h0, mask, torch.bfloat16)), errors.WrongTensor)
    ref = client.ref(spec, 1, 0, MessageDirection.activations)
    refused(
        upload(ref, seal_activations(keys, ref, torch.randn(2, 6, 16), mask, torch.float32)),
        errors.WrongTensor,
    )
    ref = client.ref(spec, 1, 0, MessageDirection.activations)
    refused(
        upload(
            ref,
            seal_activations(
                keys, ref, torch.randn(99, 6, 32), torch.ones(99, 6, dtype=torch.long), torch.float32
            ),
        ),
        errors.WrongTensor,
    )  # batch above max_batch_size
    ref = client.ref(spec, 1, 0, MessageDirection.activations)
    tampered = bytearray(seal_activations(keys, ref, h0, mask, torch.float32))
    tampered[-5] ^= 0x01
    refused(upload(ref, bytes(tampered)), errors.TamperedMessage)
    # A genuine envelope moved to another address (step 0 sealed, stored as step 3) fails too.
    sealed_for = client.ref(spec, 1, 0, MessageDirection.activations)
    moved = sealed_for.model_copy(update={"step": 3})
    refused(
        upload(moved, seal_activations(keys, sealed_for, h0, mask, torch.float32)), errors.TamperedMessage
    )
    # A message sealed with a stranger's keys under client 11's address.
    stranger = SimulatedClient(11, ClientKeyPair.generate())
    ref = client.ref(spec, 1, 0, MessageDirection.activations)
    refused(
        upload(ref, seal_activations(stranger.keys(spec, public), ref, h0, mask, torch.float32)),
        errors.TamperedMessage,
    )
    # Unknown job, foreign client, missing upload.
    with pytest.raises(errors.UnknownJob):
        harness.executor.submit(
            "flglm.server_forward",
            {
                "job_id": 999,
                "replica": 0,
                "message": ref.model_copy(update={"job_id": 999}).model_dump(mode="json"),
            },
            replica_queue(0),
        ).get(timeout_s=30)
    foreign = ref.model_copy(update={"client_id": 99})
    with pytest.raises(errors.ForeignClient):
        route_step_message(spec, foreign)
    with pytest.raises(errors.ForeignClient):
        harness.executor.submit(
            "flglm.server_forward",
            {"job_id": 7, "replica": 0, "message": foreign.model_dump(mode="json")},
            replica_queue(0),
        ).get(timeout_s=30)
    refused(client.ref(spec, 1, 0, MessageDirection.activations), errors.MissingMessage)
    # Gradients for a step that has no forward in flight.
    grad_ref = client.ref(spec, 1, 0, MessageDirection.gradients)
    refused(grad_ref, errors.StepGraphMissing)
    assert harness.counters() == {"server_steps": 0, "applied": []}

    # A valid step works: the worker is unharmed ...
    assert len(harness.sequential_step(1, 0)) == 3
    # ... and after it, a valid message that reuses an old sequence number is a replay.
    replay = client.ref(spec, 1, 1, MessageDirection.activations).model_copy(update={"sequence": 1})
    refused(upload(replay, seal_activations(keys, replay, h0, mask, torch.float32)), errors.ReplayedMessage)
    assert harness.counters()["server_steps"] == 3


def test_checkpoint_and_journal_resume_exactly(harness: Harness, tmp_path: Path) -> None:
    for step in range(3):
        harness.sequential_step(1, step)  # 9 server steps; checkpoints at 2, 4, 6, 8
    before = harness.replica()
    snapshot = latest_snapshot(replica_dir(harness.spec.checkpoint_dir, 0))
    assert snapshot is not None and snapshot.server_steps == 8
    assert len(snapshot.applied) == 8 and snapshot.optimizer_state  # AdamW moments travel too
    expected = trainable_state_dict(before.trainer.body)
    harness.executor.close()

    # A new worker process: loads checkpoint 8, replays journal entry 9 from the stored messages.
    restarted = InProcessExecutor(harness.store, harness.server_key)
    try:
        replica = restarted.runtime.replica(7, 0)
        assert replica.server_steps == 9
        assert sorted(replica.applied) == sorted(before.applied)
        got = trainable_state_dict(replica.trainer.body)
        assert all(torch.equal(expected[k], got[k]) for k in expected)
        harness.executor = restarted
        harness.sequential_step(1, 3)  # training carries on
        assert harness.counters()["server_steps"] == 12
    finally:
        restarted.close()


def test_a_crash_between_journal_and_result_publishes_the_result_on_replay(harness: Harness) -> None:
    """The step was applied and journalled, then the worker died before publishing dL/dh0: the restarted
    replica replays it and publishes the same dL/dh0, so the waiting agent finishes that step instead of
    retrying its forward on weights that already contain it."""
    harness.sequential_step(1, 0)
    harness.sequential_step(1, 1)  # 6 server steps; the last checkpoint is at 6
    client = harness.clients[11]
    batch = client_batch(11, 2 + 100)
    fwd = client.upload_forward(harness.store, harness.spec, harness.server_public, 1, 2, batch)
    assert harness.send(fwd)["status"] == "done"
    _, grad_ref, _ = client.upload_gradients(harness.store, harness.spec, harness.server_public, fwd, batch)
    assert harness.send(grad_ref)["status"] == "done"  # step 7: journalled, then dL/dh0 published
    published = client.receive(harness.store, harness.spec, harness.server_public, grad_ref)
    harness.executor.close()
    harness.store.delete(grad_ref.result_ref().blob_key())  # as if the worker died before publishing

    restarted = InProcessExecutor(harness.store, harness.server_key)
    try:
        assert restarted.runtime.replica(7, 0).server_steps == 7  # replayed from the journal, once
        harness.executor = restarted
        replayed = client.receive(harness.store, harness.spec, harness.server_public, grad_ref)
        assert torch.equal(replayed, published)
        assert (
            harness.send(grad_ref)["status"] == "done"
        )  # the redelivered backward task: answered, not re-run
        assert harness.counters()["server_steps"] == 7
    finally:
        restarted.close()


def test_round_end_checkpoint_and_client_fedavg(harness: Harness) -> None:
    harness.sequential_step(1, 0)
    result = harness.executor.submit(
        "flglm.round_end", {"job_id": 7, "replica": 0, "round_number": 1}, replica_queue(0)
    ).get(timeout_s=60)
    assert result["server_steps"] == 3 and Path(result["path"]).exists()

    spec, store, public = harness.spec, harness.store, harness.server_public
    states, uploads, counts = {}, [], {"11": 10, "12": 30, "13": 60}
    for cid, client in harness.clients.items():
        state = trainable_state_dict(client.trainer.front) | {
            f"back.{k}": v for k, v in trainable_state_dict(client.trainer.back).items()
        }
        states[cid] = state
        ref = client.ref(spec, 1, 0, MessageDirection.adapters_up)
        store.put_if_absent(ref.blob_key(), seal_adapters(client.keys(spec, public), ref, state), 60)
        uploads.append(ref)
    kwargs = {
        "job_id": 7,
        "round_number": 1,
        "uploads": [u.model_dump(mode="json") for u in uploads],
        "example_counts": counts,
    }
    assert harness.executor.submit(CLIENT_FEDAVG, kwargs, DEFAULT_QUEUE).get(timeout_s=60)["status"] == "done"
    expected = fedavg([states[c] for c in CLIENT_IDS], [10, 30, 60])
    for ref in uploads:
        client = harness.clients[ref.client_id]
        down = ref.result_ref()
        blob = store.get(down.blob_key())
        assert blob is not None
        averaged = open_adapters(client.keys(spec, public), down, blob)
        assert all(torch.equal(averaged[k], expected[k]) for k in expected)
    # Another client's result does not open with this client's keys.
    other = uploads[1].result_ref()
    with pytest.raises(Exception, match=r"authentication|expected"):
        open_adapters(harness.clients[11].keys(spec, public), other, store.get(other.blob_key()) or b"")


def test_server_hierarchical_replicas_average_every_k_steps(tmp_path: Path) -> None:
    h = Harness(
        tmp_path,
        parallel_mode=ParallelMode.server_hierarchical,
        replicas=2,
        server_fedavg_every=1,
        batch_window_s=0.2,
    )
    try:
        assert h.spec.replica_clients(0) == [11, 13] and h.spec.replica_clients(1) == [12]
        batches = {cid: client_batch(cid, 0) for cid in CLIENT_IDS}
        forwards = {
            cid: c.upload_forward(h.store, h.spec, h.server_public, 1, 0, batches[cid])
            for cid, c in h.clients.items()
        }
        handles = [h.executor.submit(*_route(h, forwards[cid])) for cid in CLIENT_IDS]
        for handle in handles:
            handle.get(timeout_s=60)
        uploads = {
            cid: c.upload_gradients(h.store, h.spec, h.server_public, forwards[cid], batches[cid])
            for cid, c in h.clients.items()
        }
        handles = [h.executor.submit(*_route(h, uploads[cid][1])) for cid in CLIENT_IDS]
        for handle in handles:
            handle.get(timeout_s=60)
        for cid, client in h.clients.items():
            client.finish(h.store, h.spec, h.server_public, uploads[cid][1])
        first = trainable_state_dict(h.replica(0).trainer.body)
        second = trainable_state_dict(h.replica(1).trainer.body)
        assert all(torch.equal(first[k], second[k]) for k in first)  # averaged after the step
        assert h.counters(0)["applied"] == ["1:0:11", "1:0:13"] and h.counters(1)["applied"] == ["1:0:12"]
    finally:
        h.executor.close()


def _route(h: Harness, ref: MessageRef) -> tuple[str, dict[str, Any], str]:
    return route_step_message(h.spec, ref)


def test_a_graph_whose_gradients_never_come_is_evicted(tmp_path: Path) -> None:
    h = Harness(tmp_path, inflight_timeout_s=0.5)
    try:
        spec, store, public = h.spec, h.store, h.server_public
        silent = h.clients[11].upload_forward(store, spec, public, 1, 0, client_batch(11, 0))
        assert h.send(silent)["status"] == "done"  # its graph now waits for gradients that never come
        waiting = h.clients[12].upload_forward(store, spec, public, 1, 0, client_batch(12, 0))
        assert h.send(waiting)["status"] == "pending"  # queued behind the step in flight
        # The eviction timer drops the silent client's graph and starts the queued forward.
        assert store.wait_for(waiting.result_ref().blob_key(), timeout_s=30) is not None
        late = h.clients[11].ref(spec, 1, 0, MessageDirection.gradients)
        with pytest.raises(errors.StepGraphMissing):
            h.send(late)
        assert h.counters()["server_steps"] == 0
    finally:
        h.executor.close()


def test_a_dropped_clients_graph_no_longer_holds_the_next_forward(harness: Harness) -> None:
    """The backend dropped client 11 (offline) while its graph waits for gradients (sequential, 600 s
    in-flight timeout): `flglm.drop_client` frees it and the queued forward of client 12 runs at once."""
    spec, store, public = harness.spec, harness.store, harness.server_public
    silent = harness.clients[11].upload_forward(store, spec, public, 1, 0, client_batch(11, 0))
    assert harness.send(silent)["status"] == "done"
    waiting = harness.clients[12].upload_forward(store, spec, public, 1, 0, client_batch(12, 0))
    assert harness.send(waiting)["status"] == "pending"
    dropped = harness.executor.submit(
        DROP_CLIENT, {"job_id": spec.job_id, "replica": 0, "client_id": 11}, replica_queue(0)
    ).get(timeout_s=30)
    assert dropped == {"status": "dropped", "forwards_forgotten": 0, "gradients_awaited": True}
    assert store.get(waiting.result_ref().blob_key()) is not None  # client 12's h1, without any timer
    assert harness.counters()["server_steps"] == 0


def test_a_client_dropped_from_a_batch_counts_as_zero_and_the_others_step(tmp_path: Path) -> None:
    """client_batch: 11 and 12 sent their gradients, 13 was dropped before sending its own: the group steps
    on the two (13's rows count zero) as soon as the drop arrives."""
    h = Harness(tmp_path, parallel_mode=ParallelMode.client_batch)
    try:
        spec, store, public = h.spec, h.store, h.server_public
        batches = {cid: client_batch(cid, 0) for cid in CLIENT_IDS}
        forwards = {
            cid: c.upload_forward(store, spec, public, 1, 0, batches[cid]) for cid, c in h.clients.items()
        }
        assert [h.send(forwards[cid])["status"] for cid in CLIENT_IDS] == ["pending", "pending", "done"]
        for cid in (11, 12):
            _, grad_ref, _ = h.clients[cid].upload_gradients(store, spec, public, forwards[cid], batches[cid])
            assert h.send(grad_ref)["status"] == "pending"  # 13's gradients are still awaited
        dropped = h.executor.submit(
            DROP_CLIENT, {"job_id": spec.job_id, "replica": 0, "client_id": 13}, replica_queue(0)
        ).get(timeout_s=30)
        assert dropped == {"status": "dropped", "forwards_forgotten": 0, "gradients_awaited": True}
        assert h.counters() == {"server_steps": 1, "applied": ["1:0:11", "1:0:12"]}
    finally:
        h.executor.close()


def test_a_checkpoint_lets_the_messages_it_covers_expire(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint_every=2: the messages (uploads and results) of the steps a checkpoint covers expire within
    CONSUMED_GRACE_S, with their journal entries; the 7th step's messages, which a restarted replica would
    replay, stay."""
    monkeypatch.setattr(worker.replica, "CONSUMED_GRACE_S", 0.2)
    harness.sequential_step(1, 0)  # three clients, one server step each
    harness.sequential_step(1, 1)  # six server steps: checkpoints at 2, 4 and 6
    spec = harness.spec
    assert harness.counters()["server_steps"] == 6
    client = harness.clients[11]
    batch = client_batch(11, 2)
    extra = client.upload_forward(harness.store, spec, harness.server_public, 1, 2, batch)
    assert harness.send(extra)["status"] == "done"
    _, grad_ref, _ = client.upload_gradients(harness.store, spec, harness.server_public, extra, batch)
    assert harness.send(grad_ref)["status"] == "done"  # the 7th step: no checkpoint covers it yet
    time.sleep(0.5)
    store = harness.store
    first = MessageRef(job_id=spec.job_id, round_number=1, step=0, client_id=11,
                       direction=MessageDirection.activations, sequence=1)  # fmt: skip
    assert store.get(first.blob_key()) is None and store.get(first.result_ref().blob_key()) is None
    assert all(store.get(journal_key(spec.job_id, 0, index)) is None for index in range(1, 7))
    assert store.get(extra.blob_key()) is not None and store.get(grad_ref.blob_key()) is not None
    assert store.get(journal_key(spec.job_id, 0, 7)) is not None


def test_a_retried_forward_supersedes_the_abandoned_attempt(harness: Harness) -> None:
    spec, store, public = harness.spec, harness.store, harness.server_public
    client, batch = harness.clients[11], client_batch(11, 0)
    first = client.upload_forward(store, spec, public, 1, 0, batch)
    assert harness.send(first)["status"] == "done"
    # The agent lost h1 (say) and retries the step from the forward with a fresh sequence number.
    retry = client.upload_forward(store, spec, public, 1, 0, batch)
    assert harness.send(retry)["status"] == "done"  # runs at once: the old attempt is dropped
    _, grad_ref, _ = client.upload_gradients(store, spec, public, retry, batch)
    assert harness.send(grad_ref)["status"] == "done"
    assert harness.counters() == {"server_steps": 1, "applied": ["1:0:11"]}


def test_bfloat16_wire_dtype_trains_close_to_the_float32_reference(tmp_path: Path) -> None:
    h = Harness(tmp_path, wire_dtype="bfloat16")
    try:
        losses = [loss for step in range(2) for loss in h.sequential_step(1, step)]
        reference = reference_sequential_losses(h.spec, CLIENT_IDS, steps=2)
        assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 5e-2
        assert h.counters()["server_steps"] == 6
    finally:
        h.executor.close()
