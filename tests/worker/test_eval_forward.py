"""Eval forwards on the worker: no training side effects, the unsplit model's logits, hostile ones refused."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flglm.adapters import add_split_adapters, load_trainable_state_dict, trainable_state_dict
from flglm.contracts import refusals as errors
from flglm.contracts.tasks import SERVER_EVAL_FORWARD, route_step_message
from flglm.split import SplitPlan, position_ids_from_attention_mask, split_model
from flglm.step_messages import PayloadLimits, open_hidden, seal_activations, seal_hidden
from flglm.step_protocol import MessageDirection, MessageRef
from flglm.tiny_models import build_tiny_model
from flglm.wire.keys import ClientKeyPair
from flglm.wire.sequence import ReplayGuard
from tests.support.engine_harness import Harness
from tests.support.step_clients import ADAPTER, HIDDEN, SimulatedClient, client_batch
from worker.admission import admit_step_upload


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, adapter={**ADAPTER, "dropout": 0.3})  # dropout: eval mode must switch it off
    yield h
    h.executor.close()


def eval_logits(h: Harness, client: SimulatedClient, ref: MessageRef, batch: dict[str, torch.Tensor]) -> Any:
    """Front (no grad) → sealed eval_activations → the eval task → eval_result → back (no grad)."""
    keys = client.keys(h.spec, h.server_public)
    parts = torch.nn.ModuleDict({"front": client.trainer.front, "back": client.trainer.back}).eval()
    with torch.no_grad():
        h0 = client.trainer.front(batch["input_ids"], batch["attention_mask"])  # (batch, seq, hidden)
    h.store.put_if_absent(
        ref.blob_key(), seal_activations(keys, ref, h0, batch["attention_mask"], torch.float32), 60
    )
    assert h.send(ref) == {"status": "done"}
    blob = h.store.get(ref.result_ref().blob_key())
    assert blob is not None
    h1 = open_hidden(keys, ref.result_ref(), blob, PayloadLimits(torch.float32, HIDDEN, 8, 64))
    with torch.no_grad():
        logits = client.trainer.back(h1, batch["attention_mask"])  # (batch, seq, vocab)
    parts.train()
    return logits


def unsplit_logits(h: Harness, client: SimulatedClient, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The whole model with the client's front/back adapters and the replica's body adapters."""
    model = build_tiny_model("llama", 0)
    split = split_model(model, SplitPlan(1, 1))
    add_split_adapters(split, h.spec.adapter, h.spec.seed)
    load_trainable_state_dict(split.part("front"), trainable_state_dict(client.trainer.front))
    load_trainable_state_dict(split.part("back"), trainable_state_dict(client.trainer.back))
    load_trainable_state_dict(split.part("body"), trainable_state_dict(h.replica().trainer.body))
    mask = batch["attention_mask"]
    with torch.no_grad():
        return model.eval()(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=position_ids_from_attention_mask(mask, mask.shape[1]),
            use_cache=False,
        ).logits  # (batch, seq, vocab)


def test_eval_forward_is_the_unsplit_model_and_leaves_training_untouched(harness: Harness) -> None:
    h = harness
    h.sequential_step(1, 0)  # trained server and client adapters, AdamW moments
    # A training step in flight: client 11's forward holds a graph and waits for its gradients.
    batch_11 = client_batch(11, 1)
    in_flight = h.clients[11].upload_forward(h.store, h.spec, h.server_public, 1, 1, batch_11)
    assert h.send(in_flight)["status"] == "done"
    replica = h.replica()
    adapters = {k: v.clone() for k, v in trainable_state_dict(replica.trainer.body).items()}
    optimizer = copy.deepcopy(replica.trainer.optimizer.optimizer.state_dict())  # type: ignore[union-attr]
    counters, graphs, guard = h.counters(), replica.trainer.pending_steps, replica.guard.state()

    client = h.clients[12]
    batch = client_batch(12, 7)
    ref = client.ref(h.spec, 1, 0, MessageDirection.eval_activations)  # eval batch 0 == training step 0
    assert route_step_message(h.spec, ref)[0] == SERVER_EVAL_FORWARD
    logits = eval_logits(h, client, ref, batch)

    expected = unsplit_logits(h, client, batch)
    real = batch["attention_mask"].bool()
    assert (logits - expected)[real].abs().max().item() <= 1e-5
    assert h.send(ref) == {"status": "done"}  # the same task again: a no-op
    # Nothing of training moved: weights, optimizer state, counters, the graph in flight, no journal entry.
    after = trainable_state_dict(replica.trainer.body)
    assert all(torch.equal(adapters[k], after[k]) for k in adapters)
    state = replica.trainer.optimizer.optimizer.state_dict()  # type: ignore[union-attr]
    assert all(
        torch.equal(optimizer["state"][i][name], state["state"][i][name])
        for i in optimizer["state"]
        for name in ("exp_avg", "exp_avg_sq")
    )
    assert h.counters() == counters and replica.trainer.pending_steps == graphs
    assert replica.trainer.body.training  # back in train mode for the next step
    assert h.store.get(f"journal:{h.spec.job_id}:0:{counters['server_steps'] + 1}") is None
    assert len(replica.guard.state()) == len(guard) + 1  # the eval stream's sequence is recorded, though

    # The in-flight training step completes as if the eval forward had never run.
    _, grad_ref, _ = h.clients[11].upload_gradients(h.store, h.spec, h.server_public, in_flight, batch_11)
    assert h.send(grad_ref)["status"] == "done"
    assert h.counters()["server_steps"] == counters["server_steps"] + 1


def test_hostile_eval_uploads_are_refused(harness: Harness) -> None:
    h = harness
    client = h.clients[11]
    keys = client.keys(h.spec, h.server_public)
    h0, mask = torch.randn(2, 6, HIDDEN), torch.ones(2, 6, dtype=torch.long)
    admission_guard = ReplayGuard()  # the backend's replay check (Redis-backed in production)

    def refused(ref: MessageRef, blob: bytes, kind: type[errors.StepRejected]) -> None:
        with pytest.raises(kind):  # at admission (the backend's check) ...
            admit_step_upload(h.spec, h.server_key, ref, blob, admission_guard)
        h.store.put_if_absent(ref.blob_key(), blob, 60)
        with pytest.raises(kind):  # ... and again in the worker task
            h.send(ref)
        assert h.store.get(ref.result_ref().blob_key()) is None

    def eval_ref() -> MessageRef:
        return client.ref(h.spec, 1, 0, MessageDirection.eval_activations)

    ref = eval_ref()
    refused(ref, seal_activations(keys, ref, h0, mask, torch.bfloat16), errors.WrongTensor)
    ref = eval_ref()
    refused(ref, seal_activations(keys, ref, torch.randn(2, 6, 8), mask, torch.float32), errors.WrongTensor)
    ref = eval_ref()
    tampered = bytearray(seal_activations(keys, ref, h0, mask, torch.float32))
    tampered[-3] ^= 0x10
    refused(ref, bytes(tampered), errors.TamperedMessage)
    # A training forward's envelope presented as an eval forward: its direction key and header differ.
    training = client.ref(h.spec, 1, 0, MessageDirection.activations)
    ref = eval_ref()
    refused(ref, seal_activations(keys, training, h0, mask, torch.float32), errors.TamperedMessage)
    # Sealed by a stranger under client 11's address.
    stranger = SimulatedClient(11, ClientKeyPair.generate())
    ref = eval_ref()
    stranger_keys = stranger.keys(h.spec, h.server_public)
    refused(ref, seal_activations(stranger_keys, ref, h0, mask, torch.float32), errors.TamperedMessage)
    foreign = eval_ref().model_copy(update={"client_id": 99})
    with pytest.raises(errors.ForeignClient):
        sealed = seal_activations(keys, eval_ref(), h0, mask, torch.float32)
        admit_step_upload(h.spec, h.server_key, foreign, sealed)
    with pytest.raises(errors.ForeignClient):
        route_step_message(h.spec, foreign)
    # An eval_result cannot be uploaded; gradients have no eval counterpart.
    result = eval_ref().result_ref()
    with pytest.raises(errors.StepRejected, match="cannot upload"):
        admit_step_upload(h.spec, h.server_key, result, seal_hidden(keys, result, h0, torch.float32))
    # A valid eval forward, then the same sequence again: a replay, at admission and in the worker.
    good = eval_ref()
    sealed = seal_activations(keys, good, h0, mask, torch.float32)
    admit_step_upload(h.spec, h.server_key, good, sealed, admission_guard)
    h.store.put_if_absent(good.blob_key(), sealed, 60)
    assert h.send(good) == {"status": "done"}
    replay = good.model_copy(update={"step": 1})
    refused(replay, seal_activations(keys, replay, h0, mask, torch.float32), errors.ReplayedMessage)
    assert h.counters() == {"server_steps": 0, "applied": []}
