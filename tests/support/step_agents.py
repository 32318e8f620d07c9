"""Data owners that enroll, approve and train a job through HTTPS with `run_client_step`."""

from __future__ import annotations

import itertools
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backend.steps.relay import StepRelay
from flglm.adapters import (
    AdapterSpec,
    add_split_adapters,
    fedavg,
    load_trainable_state_dict,
    trainable_state_dict,
)
from flglm.agent_step import (
    ClientChannel,
    client_parts,
    download_round_adapters,
    run_client_step,
    upload_round_adapters,
)
from flglm.models import load_split_parts
from flglm.protocol import AGENT_JOB_PATH, ROUND_DONE_PATH
from flglm.split import SplitPlan
from flglm.step_client import StepClient
from flglm.step_protocol import WorkerJobSpec, spec_blob_key
from flglm.trainers import ClientSideTrainer, ServerSideTrainer, TrainConfig
from flglm.wire.keys import (
    ClientKeyPair,
    derive_channel_keys,
    load_private_key,
    public_key_from_b64,
    public_key_to_b64,
)
from tests.support.control_plane import Api, LiveServer, enrollment_token, job_spec
from tests.support.step_clients import ADAPTER, MODEL_REF, TRAIN, client_batch
from worker.runtime import load_server_body

ROUNDS = 2
STEPS = 2


def tiny_client_trainer(seed: int = 0) -> ClientSideTrainer:
    """Front and back of the tiny Llama with the job's adapters, initialised from the job seed."""
    split = load_split_parts(MODEL_REF, SplitPlan(1, 1), parts={"front", "back"})
    add_split_adapters(split, AdapterSpec(**ADAPTER), seed)
    return ClientSideTrainer(split, TrainConfig(**TRAIN))


@dataclass
class DataOwner:
    name: str
    client_id: int
    credential: str
    keypair: ClientKeyPair
    example_count: int
    trainer: ClientSideTrainer = field(default_factory=tiny_client_trainer)
    losses: list[float] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)  # per step: 1, or more when the server lost it
    make_client: Callable[[LiveServer, str], StepClient] | None = None  # a test's own transport
    _sequence: Any = field(default_factory=lambda: itertools.count(1))

    def channel(self, live: LiveServer, job_id: int, server_public_b64: str) -> ClientChannel:
        keys = derive_channel_keys(
            self.keypair.private_key, public_key_from_b64(server_public_b64), str(job_id), str(self.client_id)
        )
        if self.make_client is not None:
            client = self.make_client(live, self.credential)
        else:
            client = StepClient(live.base_url, self.credential, live.tls.ca_cert, max_retries=2)
        return ClientChannel(
            client, keys, job_id, self.client_id, torch.float32, lambda: next(self._sequence), 60.0
        )


def enroll_owner(api: Api, name: str, example_count: int) -> DataOwner:
    keypair = ClientKeyPair.generate()
    body = api.as_(None).ok(
        "POST",
        "/agent/enroll",
        201,
        json={"token": enrollment_token(api, name), "public_key": keypair.public_b64, "example_count": 1},
    )
    return DataOwner(name, body["client_id"], body["credential"], keypair, example_count)


def start_job(api: Api, owners: list[DataOwner], mode: str, **overrides: Any) -> int:
    """A tiny-Llama generation job of ROUNDS x STEPS, approved by every owner and started."""
    spec = job_spec(
        [o.name for o in owners],
        model_ref=MODEL_REF,
        task_type="generation",
        adapter=ADAPTER,
        hyperparameters={**TRAIN, "max_batch_size": 8, "max_seq_len": 64, "batch_window_s": 30.0},
        parallel_mode=mode,
        rounds=ROUNDS,
        steps_per_round=STEPS,
    )
    spec.update(overrides)
    job = api.ok("POST", "/jobs", 201, json=spec)
    api.ok("POST", f"/jobs/{job['id']}/open")
    for owner in owners:
        api.as_(owner.credential).ok(
            "POST", f"/agent/invitations/{job['id']}/decision", json={"decision": "approve"}
        )
    api.ok("POST", f"/jobs/{job['id']}/start")
    job_id: int = job["id"]
    return job_id


def server_public_key(api: Api, owner: DataOwner, job_id: int) -> str:
    key: str = api.as_(owner.credential).ok("GET", AGENT_JOB_PATH.format(job_id=job_id))["server_public_key"]
    return key


def assert_job_has_its_own_key(live: LiveServer, api: Api, owner: DataOwner, job_id: int) -> Path:
    """The workers' spec names the job's 0600 key file, whose public half (not the deployment's) the agents
    got; returns its path."""
    spec = published_spec(live.app.state.step_relay, job_id)
    assert spec.server_key_file is not None
    key_file = Path(spec.server_key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    published = server_public_key(api, owner, job_id)
    assert published == public_key_to_b64(load_private_key(key_file).public_key())
    assert published != live.app.state.server_public_key_b64
    return key_file


def finish_round(api: Api, owner: DataOwner, channel: ClientChannel, job_id: int, round_number: int) -> None:
    upload_round_adapters(owner.trainer, channel, round_number, owner.example_count)
    api.as_(owner.credential).ok(
        "POST",
        ROUND_DONE_PATH.format(job_id=job_id, round_number=round_number),
        json={"example_count": owner.example_count},
    )
    download_round_adapters(owner.trainer, channel, round_number, timeout_s=60)


def close_round(
    api: Api, owners: list[DataOwner], channels: list[ClientChannel], job_id: int, number: int
) -> None:
    """One step per owner, then each owner's adapters up and round done (the last one closes the round)."""
    for owner, channel in zip(owners, channels, strict=True):
        run_client_step(owner.trainer, channel, number, 0, client_batch(owner.client_id, number))
    for owner, channel in zip(owners, channels, strict=True):
        upload_round_adapters(owner.trainer, channel, number, owner.example_count)
        done_path = ROUND_DONE_PATH.format(job_id=job_id, round_number=number)
        api.as_(owner.credential).ok("POST", done_path, json={"example_count": owner.example_count})


def train_sequentially(api: Api, live: LiveServer, owners: list[DataOwner], job_id: int) -> None:
    """One client after the other at every step (the order `sequential` mode's reference uses)."""
    server_b64 = server_public_key(api, owners[0], job_id)
    channels = [o.channel(live, job_id, server_b64) for o in owners]
    for round_number in range(1, ROUNDS + 1):
        for step in range(STEPS):
            for owner, channel in zip(owners, channels, strict=True):
                batch = client_batch(owner.client_id, step + 100 * round_number)
                result = run_client_step(owner.trainer, channel, round_number, step, batch)
                owner.losses.append(result.loss)
                owner.attempts.append(result.attempts)
        for owner, channel in zip(owners, channels, strict=True):
            upload_round_adapters(owner.trainer, channel, round_number, owner.example_count)
            api.as_(owner.credential).ok(
                "POST",
                ROUND_DONE_PATH.format(job_id=job_id, round_number=round_number),
                json={"example_count": owner.example_count},
            )
        for owner, channel in zip(owners, channels, strict=True):
            download_round_adapters(owner.trainer, channel, round_number, timeout_s=60)
    for channel in channels:
        channel.client.close()


def train_concurrently(api: Api, live: LiveServer, owners: list[DataOwner], job_id: int) -> None:
    """Every owner in its own thread, as separate agents would; a barrier waits for the next round to open."""
    server_b64 = server_public_key(api, owners[0], job_id)
    barrier = threading.Barrier(len(owners))
    errors: list[BaseException] = []

    def agent(owner: DataOwner) -> None:
        channel = owner.channel(live, job_id, server_b64)
        with channel.client:
            try:
                for round_number in range(1, ROUNDS + 1):
                    for step in range(STEPS):
                        batch = client_batch(owner.client_id, step + 100 * round_number)
                        owner.losses.append(
                            run_client_step(owner.trainer, channel, round_number, step, batch).loss
                        )
                    finish_round(api, owner, channel, job_id, round_number)
                    barrier.wait(timeout=120)
            except BaseException as exc:
                errors.append(exc)
                barrier.abort()

    threads = [threading.Thread(target=agent, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors


def published_spec(runtime: StepRelay, job_id: int) -> WorkerJobSpec:
    data = runtime.store.get(spec_blob_key(job_id))
    assert data is not None
    return WorkerJobSpec.model_validate_json(data)


def reference_sequential_losses(spec: WorkerJobSpec, owners: list[DataOwner]) -> list[list[float]]:
    """`SplitTrainer`'s step (ClientSideTrainer + ServerSideTrainer, one body shared by all clients) in
    the sequential order, with the example-weighted client FedAvg between rounds; losses per owner."""
    server = ServerSideTrainer(load_server_body(spec), TrainConfig(**TRAIN))
    trainers = [tiny_client_trainer(spec.seed) for _ in owners]
    losses: list[list[float]] = [[] for _ in owners]
    for round_number in range(1, ROUNDS + 1):
        for step in range(STEPS):
            for index, (owner, trainer) in enumerate(zip(owners, trainers, strict=True)):
                batch = client_batch(owner.client_id, step + 100 * round_number)
                h0 = trainer.forward_front(batch)  # (batch, seq, hidden)
                h1 = server.forward("step", h0, batch["attention_mask"])  # (batch, seq, hidden)
                losses[index].append(float(trainer.forward_back(h1, batch).detach()))
                trainer.backward_front(server.backward("step", trainer.backward_back()))
                trainer.step()
                server.step()
        averaged = fedavg(
            [trainable_state_dict(client_parts(t)) for t in trainers],
            [float(o.example_count) for o in owners],
        )
        for trainer in trainers:
            load_trainable_state_dict(client_parts(trainer), averaged)
    return losses


def client_states(owners: list[DataOwner]) -> list[dict[str, torch.Tensor]]:
    return [trainable_state_dict(client_parts(o.trainer)) for o in owners]
