"""A tiny job's trained adapters on the checkpoint volume, its unsplit greedy output, the session routes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.exports.service import job_checkpoint_dir
from backend.settings import Settings
from flglm.adapters import AdapterSpec, add_split_adapters, load_trainable_state_dict, trainable_state_dict
from flglm.export import client_parts_from_bundle, read_export_bundle
from flglm.generation import RemoteBody, SamplingConfig, generate_through_split
from flglm.generation_client import GenerationSessionClient
from flglm.generation_protocol import TENSORS_MEDIA_TYPE
from flglm.models import load_model, load_tokenizer
from flglm.split import SplitPlan, split_model
from tests.support.control_plane import ADMIN_TOKEN, Api, LiveServer, job_spec
from worker.checkpoints import ReplicaSnapshot, replica_dir, save_snapshot
from worker.fedavg import save_global_client_adapters

PROMPTS = ["the news today", "a storm over the"]  # different lengths: the batch is left-padded
NEW_TOKENS = 6


def write_trained_adapters(settings: Settings, job_id: int) -> tuple[dict[str, torch.Tensor], ...]:
    """What the workers leave on the checkpoint volume after a round: server snapshot + client average."""
    split = add_split_adapters(split_model(load_model("tiny:llama"), SplitPlan(1, 1)), AdapterSpec(r=8), 0)
    with torch.no_grad():
        for parameter in split.as_module_dict().parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    client = trainable_state_dict(split.as_module_dict(["front", "back"]))
    body = trainable_state_dict(split.part("body"))
    directory = job_checkpoint_dir(settings, job_id)
    snapshot = ReplicaSnapshot(4, body, {0: {"exp_avg": torch.ones(2)}}, [], {}, [], [])
    save_snapshot(replica_dir(directory, 0), snapshot)
    save_global_client_adapters(directory, 1, client)
    return client, body


@dataclass(frozen=True)
class Reference:
    """The prompts as the caller tokenizes them and what the unsplit model generates from them."""

    input_ids: torch.Tensor  # (batch, prompt), left-padded
    attention_mask: torch.Tensor  # (batch, prompt)
    sequences: torch.Tensor  # (batch, prompt + new), the unsplit model's greedy `generate`
    completions: list[str]


def trained_job(api: Api, settings: Settings) -> tuple[int, Reference]:
    """A tiny-llama job whose server checkpoint and client average exist, and the unsplit reference."""
    job_id: int = api.ok("POST", "/jobs", 201, json=job_spec([], model_ref="tiny:llama"))["id"]
    client, body = write_trained_adapters(settings, job_id)
    model = load_model("tiny:llama").eval()
    split = add_split_adapters(split_model(model, SplitPlan(1, 1)), AdapterSpec(r=8), 0)
    load_trainable_state_dict(split.as_module_dict(["front", "back"]), client)
    load_trainable_state_dict(split.part("body"), body)  # `model` shares these modules: it is the reference
    tokenizer = load_tokenizer("tiny:llama")
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        sequences = model.generate(  # type: ignore[operator]
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
    new_tokens = sequences[:, encoded["input_ids"].shape[1] :]  # (batch, new)
    completions = list(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return job_id, Reference(encoded["input_ids"], encoded["attention_mask"], sequences, completions)


HIDDEN = 32  # tiny:llama's hidden size


def session_client(live_server: LiveServer, job_id: int, token: str = ADMIN_TOKEN) -> GenerationSessionClient:
    return GenerationSessionClient(live_server.base_url, token, job_id, live_server.tls.ca_cert)


def generate_through_sessions(
    live_server: LiveServer, api: Api, job_id: int, reference: Reference
) -> torch.Tensor:
    """What `flglm generate` does: front and back here from the export bundle, the body through the routes."""
    split = client_parts_from_bundle(read_export_bundle(api.get(f"/jobs/{job_id}/export").content))
    tokenizer = load_tokenizer("tiny:llama")
    with session_client(live_server, job_id) as remote:
        opened = remote.open()
        assert opened.hidden_size == HIDDEN and opened.server_checkpoint.startswith("step-")
        return generate_through_split(
            split,
            reference.input_ids,
            reference.attention_mask,
            SamplingConfig(max_new_tokens=NEW_TOKENS),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or 0,
            body_step=RemoteBody(remote.run_body),
        )


def body_call(api: Api, job_id: int, session_id: str, data: bytes, media: str = TENSORS_MEDIA_TYPE) -> int:
    path = f"/jobs/{job_id}/generate/sessions/{session_id}/body"
    return api.post(path, content=data, headers={"Content-Type": media}).status_code
