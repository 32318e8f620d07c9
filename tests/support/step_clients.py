"""Simulated data owners driving the worker engine through sealed messages, and their in-process reference."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flglm.adapters import AdapterSpec, add_split_adapters
from flglm.contracts.blob_store import BlobStore
from flglm.models import load_split_parts
from flglm.split import SplitPlan
from flglm.step_messages import (
    PayloadLimits,
    open_hidden,
    seal_activations,
    seal_hidden,
)
from flglm.step_protocol import JobClient, MessageDirection, MessageRef, WorkerJobSpec
from flglm.trainers import ClientSideTrainer, ServerSideTrainer, TrainConfig
from flglm.wire.codec import parse_wire_dtype
from flglm.wire.keys import ChannelKeys, ClientKeyPair, derive_channel_keys
from worker.runtime import load_server_body

MODEL_REF = "tiny:llama:0"
VOCAB = 384
HIDDEN = 32
TRAIN: dict[str, Any] = {"lr": 5e-3}
ADAPTER: dict[str, Any] = {"r": 4, "alpha": 8}
CLIENT_IDS = [11, 12, 13]  # the data owners of the engine and Celery harnesses


def make_spec(
    job_id: int, clients: list[tuple[int, ClientKeyPair]], checkpoint_dir: Path, **overrides: Any
) -> WorkerJobSpec:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "model_ref": MODEL_REF,
        "adapter": ADAPTER,
        "hyperparameters": TRAIN,
        "clients": [JobClient(client_id=cid, public_key=pair.public_b64) for cid, pair in clients],
        "checkpoint_dir": str(checkpoint_dir),
        "max_batch_size": 8,
        "max_seq_len": 64,
        "batch_window_s": 30.0,
    }
    fields.update(overrides)
    return WorkerJobSpec(**fields)


def client_batch(client_id: int, step: int, rows: int = 2, seq: int = 6 + 0) -> dict[str, torch.Tensor]:
    """Deterministic random tokens for (client, step); sequence lengths differ per client (right padded)."""
    generator = torch.Generator().manual_seed(1000 * client_id + step)
    length = seq + client_id % 3  # different lengths per client exercise the padding
    input_ids = torch.randint(2, VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[0, -2:] = 0  # one padded row inside the client's own batch
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SimulatedClient:
    """A data owner: its front/back with adapters, its key pair and its sequence numbers."""

    def __init__(self, client_id: int, keypair: ClientKeyPair, spec_seed: int = 0) -> None:
        self.client_id = client_id
        self.keypair = keypair
        split = load_split_parts(MODEL_REF, SplitPlan(1, 1), parts={"front", "back"})
        add_split_adapters(split, AdapterSpec(**ADAPTER), spec_seed)
        self.trainer = ClientSideTrainer(split, TrainConfig(**TRAIN))
        self._sequence = itertools.count(1)
        self._keys: ChannelKeys | None = None

    def keys(self, spec: WorkerJobSpec, server_public: Any) -> ChannelKeys:
        if self._keys is None:
            self._keys = derive_channel_keys(
                self.keypair.private_key, server_public, str(spec.job_id), str(self.client_id)
            )
        return self._keys

    def ref(
        self, spec: WorkerJobSpec, round_number: int, step: int, direction: MessageDirection
    ) -> MessageRef:
        return MessageRef(
            job_id=spec.job_id,
            round_number=round_number,
            step=step,
            client_id=self.client_id,
            direction=direction,
            sequence=next(self._sequence),
        )

    def upload_forward(
        self,
        store: BlobStore,
        spec: WorkerJobSpec,
        server_public: Any,
        round_number: int,
        step: int,
        batch: dict[str, torch.Tensor],
    ) -> MessageRef:
        h0 = self.trainer.forward_front(batch)  # (batch, seq, hidden)
        self.last_h0 = h0
        ref = self.ref(spec, round_number, step, MessageDirection.activations)
        wire = parse_wire_dtype(spec.wire_dtype)
        assert wire is not None
        sealed = seal_activations(self.keys(spec, server_public), ref, h0, batch["attention_mask"], wire)
        store.put_if_absent(ref.blob_key(), sealed, 600)
        return ref

    def receive(
        self, store: BlobStore, spec: WorkerJobSpec, server_public: Any, ref: MessageRef
    ) -> torch.Tensor:
        result = ref.result_ref()
        blob = store.wait_for(result.blob_key(), timeout_s=60)
        assert blob is not None, f"no result at {result.blob_key()}"
        limits = PayloadLimits(parse_wire_dtype(spec.wire_dtype) or torch.float32, HIDDEN, 64, 4096)
        return open_hidden(self.keys(spec, server_public), result, blob, limits)

    def upload_gradients(
        self,
        store: BlobStore,
        spec: WorkerJobSpec,
        server_public: Any,
        fwd: MessageRef,
        batch: dict[str, torch.Tensor],
    ) -> tuple[float, MessageRef, torch.Tensor]:
        h1 = self.receive(store, spec, server_public, fwd)
        loss = self.trainer.forward_back(h1, batch)
        grad_h1 = self.trainer.backward_back()  # (batch, seq, hidden)
        ref = self.ref(spec, fwd.round_number, fwd.step, MessageDirection.gradients)
        wire = parse_wire_dtype(spec.wire_dtype)
        assert wire is not None
        store.put_if_absent(
            ref.blob_key(), seal_hidden(self.keys(spec, server_public), ref, grad_h1, wire), 600
        )
        return float(loss.detach()), ref, grad_h1

    def finish(
        self, store: BlobStore, spec: WorkerJobSpec, server_public: Any, grad_ref: MessageRef
    ) -> torch.Tensor:
        grad_h0 = self.receive(store, spec, server_public, grad_ref)
        self.trainer.backward_front(grad_h0)
        self.trainer.step()
        return grad_h0


def reference_sequential_losses(
    spec: WorkerJobSpec, client_ids: list[int], steps: int, rounds: int = 1
) -> list[float]:
    """The in-process split step (ClientSideTrainer + ServerSideTrainer, as in SplitTrainer) for each client
    in turn, sharing one server body: what `sequential` mode must reproduce."""
    server = ServerSideTrainer(load_server_body(spec), TrainConfig(**TRAIN))
    clients = {cid: SimulatedClient(cid, ClientKeyPair.generate()).trainer for cid in client_ids}
    losses = []
    for round_number in range(1, rounds + 1):
        for step in range(steps):
            for cid in client_ids:
                batch = client_batch(cid, step + 100 * round_number)
                trainer = clients[cid]
                h0 = trainer.forward_front(batch)
                h1 = server.forward("k", h0, batch["attention_mask"])
                losses.append(float(trainer.forward_back(h1, batch).detach()))
                grad_h0 = server.backward("k", trainer.backward_back())
                trainer.backward_front(grad_h0)
                trainer.step()
                server.step()
    return losses


TaskCall = Callable[[str, dict[str, Any]], dict[str, Any]]
