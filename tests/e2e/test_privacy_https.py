"""Defended jobs over HTTPS with the in-process executor, measured on the server's side of the wire.

What the server receives is read back from the executor's blob store and opened with the job's own server
key, exactly as the worker opens it, and compared with what the client would have sent undefended: noisy h0
is the clipped h0 plus noise of norm m·C, dL/dh1 carries noise of g × its RMS, a private input block's
adapters never reach the server (not in any upload, not in the FedAvg file, not in the export) and its h0
differs from the public block's from the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from backend.exports.service import job_checkpoint_dir
from backend.settings import Settings
from flglm.adapters import AdapterSpec, trainable_state_dict
from flglm.agent_step import (
    ClientChannel,
    download_round_adapters,
    run_client_eval_forward,
    run_client_step,
    upload_round_adapters,
)
from flglm.export import export_peft_adapter, read_export_bundle, split_from_bundle
from flglm.models import load_split_parts
from flglm.privacy.client import ClientDefence, add_client_adapters
from flglm.privacy.defences import public_weights, reference_h0_norm
from flglm.protocol import ROUND_DONE_PATH, PrivacySpec
from flglm.split import SplitPlan
from flglm.step_messages import PayloadLimits, open_activations, open_adapters, open_hidden
from flglm.step_protocol import MessageDirection, MessageRef, client_adapters_ref
from flglm.trainers import ClientSideTrainer, TrainConfig
from flglm.wire.keys import ChannelKeys, derive_channel_keys, load_private_key, public_key_from_b64
from tests.support.control_plane import Api, LiveServer
from tests.support.step_agents import DataOwner, enroll_owner, published_spec, server_public_key, start_job
from tests.support.step_clients import ADAPTER, HIDDEN, MODEL_REF, TRAIN, VOCAB, client_batch

LIMITS = PayloadLimits(torch.float32, HIDDEN, 8, 64)


@dataclass
class RecordingChannel(ClientChannel):
    """A client channel that remembers the address of every message it sends."""

    sent: list[MessageRef] = field(default_factory=list)

    def ref(self, round_number: int, step: int, direction: MessageDirection) -> MessageRef:
        made = super().ref(round_number, step, direction)
        self.sent.append(made)
        return made


def client_trainer(privacy: dict[str, Any] | None, private_seed: int | None = None) -> ClientSideTrainer:
    """The owner's front and back as the agent builds them for these settings (None: undefended)."""
    spec = PrivacySpec.model_validate(privacy or {})
    split = load_split_parts(MODEL_REF, SplitPlan(1, 1), parts={"front", "back"})
    add_client_adapters(split, AdapterSpec(**ADAPTER), 0, private_seed, spec.private_init_scale)
    defence = ClientDefence.from_spec(spec, split.part("front")) if privacy is not None else None
    return ClientSideTrainer(split, TrainConfig(**TRAIN), defence)


def recording_channel(live: LiveServer, api: Api, owner: DataOwner, job_id: int) -> RecordingChannel:
    plain = owner.channel(live, job_id, server_public_key(api, owner, job_id))
    return RecordingChannel(
        plain.client, plain.keys, job_id, owner.client_id, torch.float32, plain.next_sequence, 60.0
    )


def server_keys(live: LiveServer, owner: DataOwner, job_id: int) -> ChannelKeys:
    """The keys the worker derives for this owner from the job's own private key file."""
    spec = published_spec(live.app.state.step_relay, job_id)
    assert spec.server_key_file is not None
    return derive_channel_keys(
        load_private_key(Path(spec.server_key_file)),
        public_key_from_b64(owner.keypair.public_b64),
        str(job_id),
        str(owner.client_id),
    )


def received(live: LiveServer, ref: MessageRef) -> bytes:
    blob = live.app.state.step_relay.store.get(ref.blob_key())
    assert blob is not None, f"the server holds no {ref.blob_key()}"
    return bytes(blob)


def train_one_round(
    api: Api, live: LiveServer, owners: list[DataOwner], job_id: int, steps: int
) -> list[RecordingChannel]:
    """Sequential steps of round 1 through `run_client_step`, then the adapters' FedAvg."""
    channels = [recording_channel(live, api, owner, job_id) for owner in owners]
    for step in range(steps):
        for owner, channel in zip(owners, channels, strict=True):
            result = run_client_step(
                owner.trainer, channel, 1, step, client_batch(owner.client_id, step + 100)
            )
            owner.losses.append(result.loss)
            owner.attempts.append(result.attempts)
    for owner, channel in zip(owners, channels, strict=True):  # every upload before anyone waits for FedAvg
        upload_round_adapters(owner.trainer, channel, 1, owner.example_count)
        api.as_(owner.credential).ok(
            "POST", ROUND_DONE_PATH.format(job_id=job_id, round_number=1), json={"example_count": 1}
        )
    for owner, channel in zip(owners, channels, strict=True):
        download_round_adapters(owner.trainer, channel, 1, timeout_s=60)
    return channels


def first_of(channel: RecordingChannel, direction: MessageDirection) -> MessageRef:
    return next(ref for ref in channel.sent if ref.direction is direction)


def test_server_receives_clipped_noised_h0_and_noised_gradients(live_server: LiveServer, api: Api) -> None:
    m, c, g = 0.3, 0.5, 0.5
    privacy = {"activation_noise": m, "activation_clip": c, "gradient_noise": g}
    owner = enroll_owner(api, "owner-0", 10)
    owner.trainer = client_trainer(privacy)
    job_id = start_job(api, [owner], "sequential", rounds=1, steps_per_round=2, privacy=privacy)
    [channel] = train_one_round(api, live_server, [owner], job_id, steps=2)
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    assert owner.attempts == [1, 1] and all(torch.isfinite(torch.tensor(owner.losses)))
    batch = client_batch(owner.client_id, 100)
    eval_batch = client_batch(owner.client_id, 7)
    run_client_eval_forward(
        owner.trainer, channel, 1, 0, eval_batch["input_ids"], eval_batch["attention_mask"]
    )
    channel.client.close()

    # Undefended reference of step 0: the same initial adapters, no defence.
    clean_trainer = client_trainer(None)
    front = clean_trainer.front
    with public_weights(front):
        clip = c * reference_h0_norm(front, VOCAB)
    keys = server_keys(live_server, owner, job_id)
    real = batch["attention_mask"].bool()
    forward = first_of(channel, MessageDirection.activations)
    assert (forward.round_number, forward.step) == (1, 0)
    h0_server, mask = open_activations(keys, forward, received(live_server, forward), LIMITS)
    assert torch.equal(mask, batch["attention_mask"])
    clean = clean_trainer.forward_front(batch)  # (batch, seq, hidden)
    assert bool((clean.norm(dim=-1)[real] > clip).all())  # the clip binds: without it the test proves nothing
    clipped = clean * (clip / clean.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    noise = (h0_server - clipped).norm(dim=-1)  # (batch, seq): per-token noise the server got
    assert float(noise.mean()) == pytest.approx(m * clip, rel=0.15)
    assert float(noise.min()) > 0.3 * m * clip and float(noise.max()) < 2.0 * m * clip
    assert float(h0_server.norm(dim=-1).max()) < clip * (1 + 2 * m)  # the clip holds for every token

    # dL/dh1 of step 0 as the server received it, against the clean one for the h1 the server returned.
    h1 = open_hidden(
        keys, forward.result_ref(), received(live_server, forward.result_ref()), LIMITS, clean.shape
    )
    clean_trainer.forward_back(h1, batch)
    clean_grad = clean_trainer.backward_back()
    backward = first_of(channel, MessageDirection.gradients)
    assert (backward.round_number, backward.step) == (1, 0)
    grad_server = open_hidden(keys, backward, received(live_server, backward), LIMITS, clean.shape)
    rms = float(clean_grad.pow(2).mean().sqrt())
    assert float((grad_server - clean_grad).std()) == pytest.approx(g * rms, rel=0.2)

    # The eval forward's h0 is defended too.
    evaluated = first_of(channel, MessageDirection.eval_activations)
    h0_eval, _ = open_activations(keys, evaluated, received(live_server, evaluated), LIMITS)
    assert float(h0_eval.norm(dim=-1).max()) < clip * (1 + 2 * m)


def test_private_input_block_never_reaches_the_server_and_the_export_says_so(
    live_server: LiveServer, api: Api, settings: Settings, tmp_path: Path
) -> None:
    privacy = {"private_front": True, "private_init_scale": 0.1, "decorrelation": 0.5, "gradient_noise": 0.1}
    seeds = [1_234_567_891, 987_654_321]
    owners = [enroll_owner(api, f"owner-{i}", 10 * (i + 1)) for i in range(2)]
    for owner, seed in zip(owners, seeds, strict=True):
        owner.trainer = client_trainer(privacy, private_seed=seed)
    initial_fronts = [trainable_state_dict(o.trainer.front) for o in owners]
    job_id = start_job(api, owners, "sequential", rounds=1, steps_per_round=2, privacy=privacy)
    channels = train_one_round(api, live_server, owners, job_id, steps=2)
    for channel in channels:
        channel.client.close()
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    assert all(torch.isfinite(torch.tensor(o.losses)).all() for o in owners)

    fronts = [trainable_state_dict(o.trainer.front) for o in owners]
    backs = [trainable_state_dict(o.trainer.back) for o in owners]
    assert fronts[0] and all(torch.equal(backs[0][k], backs[1][k]) for k in backs[0])  # FedAvg'd
    assert all(not torch.equal(fronts[0][k], fronts[1][k]) for k in fronts[0])  # private: never averaged
    assert any(not torch.equal(fronts[0][k], initial_fronts[0][k]) for k in fronts[0])  # and it trained
    private_values = [t for state in (*initial_fronts, *fronts) for t in state.values()]

    def holds_front_values(state: dict[str, torch.Tensor]) -> bool:
        return any(t.shape == p.shape and torch.equal(t, p) for t in state.values() for p in private_values)

    # Every adapter upload, opened with the server's key: only output-block adapters.
    for owner in owners:
        ref = client_adapters_ref(job_id, 1, owner.client_id)
        uploaded = open_adapters(server_keys(live_server, owner, job_id), ref, received(live_server, ref))
        assert uploaded and all(name.startswith("back.") for name in uploaded), sorted(uploaded)
        assert not holds_front_values(uploaded)
    # The server's plaintext FedAvg file (what the export reads) has no input-block adapters either.
    [fedavg_file] = (Path(job_checkpoint_dir(settings, job_id)) / "client-adapters").glob("*.safetensors")
    averaged = load_file(str(fedavg_file))
    assert (
        averaged and all(name.startswith("back.") for name in averaged) and not holds_front_values(averaged)
    )

    # Step 0's h0 on the server is the private block's, not the public block's (LoRA B would be 0).
    owner, channel = owners[0], channels[0]
    batch = client_batch(owner.client_id, 100)
    forward = first_of(channel, MessageDirection.activations)
    h0_server, _ = open_activations(
        server_keys(live_server, owner, job_id), forward, received(live_server, forward), LIMITS
    )
    h0_private = client_trainer(privacy, private_seed=seeds[0]).forward_front(batch)  # no h0 noise here
    assert torch.allclose(h0_server, h0_private, atol=1e-6)
    h0_public = client_trainer(None).forward_front(batch)
    assert float((h0_server - h0_public).norm()) > 0.05 * float(h0_public.norm())

    # The export has the public input block, says why, and still loads, exports and generates.
    bundle = read_export_bundle(api.get(f"/jobs/{job_id}/export").content)
    assert bundle.private_front and bundle.note is not None and "stay with each data owner" in bundle.note
    assert "front" not in bundle.adapter_cfg.parts
    assert bundle.front_back_state and all(k.startswith("back.") for k in bundle.front_back_state)
    split = split_from_bundle(bundle)
    assert not any("lora_" in name for name, _ in split.part("front").named_parameters())
    written = export_peft_adapter(
        bundle.model_ref,
        bundle.plan,
        bundle.adapter_cfg,
        bundle.front_back_state,
        bundle.body_state,
        tmp_path,
    )
    assert (written / "adapter_model.safetensors").is_file()
    answer = api.ok("POST", f"/jobs/{job_id}/generate", json={"prompts": ["hello"], "max_new_tokens": 2})
    assert len(answer["completions"]) == 1
