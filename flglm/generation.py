"""Text generation through the split model with a KV cache in every part (front, body, back).

Each part keeps its own `DynamicCache` (built from the model config, so it addresses layers by their index in
the whole model and fills only its own), which is what lets the body's cache live on another machine than the
caller's front and back caches. Per step only the new positions' hidden states (batch, new, hidden) and the
growing attention mask cross the cut, as in training.

`generate_through_split` takes the body as a `BodyStep` callable, `(hidden_states, attention_mask) ->
hidden_states`: `LocalBody` runs the server body in this process with its cache (offline use, tests);
`RemoteBody` sends each call through a transport (bytes in, bytes out) to a worker that keeps the body's
cache in a generation session (`worker.generation`): the backend's generate route submits the call to the
executor, `flglm generate` posts it to the session routes (`flglm.generation_protocol`). Both directions are
safetensors dicts built and checked here (`encode_body_input` / `decode_body_input`, `encode_body_output` /
`decode_body_output`), never pickle. Greedy decoding equals the unsplit model's `generate(do_sample=False)`
token for token (tests), with the same EOS/padding rules.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from flglm.export import client_parts_from_bundle, read_export_bundle
from flglm.generation_protocol import ATTENTION_MASK, HIDDEN_STATES, BodyTransport, SamplingConfig
from flglm.models import load_tokenizer
from flglm.split import ServerBody, SplitModel
from flglm.step_messages import PayloadLimits, WrongPayload
from flglm.wire.codec import FLOAT_WIRE_DTYPES, decode_tensors, dtype_name, encode_tensors

BodyStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LocalBody:
    """The server body run in this process, with its own KV cache (one per generation)."""

    def __init__(self, body: ServerBody, config: object) -> None:
        self.body = body
        self.cache = DynamicCache(config=config)  # type: ignore[arg-type]

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(hidden_states, attention_mask, past_key_values=self.cache)  # (batch, new, hidden)


def encode_body_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
    """Safetensors of the new positions' hidden states (batch, new, hidden) and mask (batch, cached + new)."""
    return encode_tensors({HIDDEN_STATES: hidden_states, ATTENTION_MASK: attention_mask.long()})


def decode_body_input(
    data: bytes, hidden_size: int, max_batch_size: int, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states, attention_mask) from untrusted bytes; `WrongPayload` (or a `DecodeError`) naming the
    problem for anything else: names, dtypes, ranks, hidden size, batch and token limits, mask values."""
    limits = PayloadLimits(torch.float32, hidden_size, max_batch_size, max_tokens)  # the step messages' bound
    tensors = decode_tensors(data, max_bytes=limits.max_bytes)
    if set(tensors) != {HIDDEN_STATES, ATTENTION_MASK}:
        raise WrongPayload(f"body input holds {sorted(tensors)}; expected {[ATTENTION_MASK, HIDDEN_STATES]}")
    hidden, mask = tensors[HIDDEN_STATES], tensors[ATTENTION_MASK]
    if dtype_name(hidden.dtype) not in FLOAT_WIRE_DTYPES:
        raise WrongPayload(
            f"hidden_states dtype {dtype_name(hidden.dtype)}; expected one of {FLOAT_WIRE_DTYPES}"
        )
    if hidden.dim() != 3 or hidden.shape[-1] != hidden_size:
        raise WrongPayload(f"hidden_states shape {list(hidden.shape)}; expected (batch, new, {hidden_size})")
    batch, new = hidden.shape[0], hidden.shape[1]
    if not 1 <= batch <= max_batch_size:
        raise WrongPayload(f"hidden_states batch {batch} outside 1..{max_batch_size}")
    if new < 1:
        raise WrongPayload("hidden_states hold no position")
    if mask.dtype != torch.int64 or mask.dim() != 2 or mask.shape[0] != batch:
        raise WrongPayload(
            f"attention_mask {dtype_name(mask.dtype)} {list(mask.shape)}; expected int64 ({batch}, tokens)"
        )
    if not new <= mask.shape[1] <= max_tokens:
        raise WrongPayload(f"attention_mask covers {mask.shape[1]} tokens; expected {new}..{max_tokens}")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise WrongPayload("attention_mask values must be 0 or 1")
    return hidden, mask


def encode_body_output(hidden_states: torch.Tensor) -> bytes:
    return encode_tensors({HIDDEN_STATES: hidden_states})


def decode_body_output(data: bytes, like: torch.Tensor) -> torch.Tensor:
    """The body's output, which must have the shape and dtype of the input it answers (`like`)."""
    expected = {HIDDEN_STATES: (like.dtype, tuple(like.shape))}
    return decode_tensors(data, max_bytes=like.numel() * like.element_size(), expected=expected)[
        HIDDEN_STATES
    ]


class RemoteBody:
    """The server body on a worker: each call goes through `transport` (encoded input -> encoded output);
    the worker's generation session holds the body's KV cache."""

    def __init__(self, transport: BodyTransport) -> None:
        self.transport = transport

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        answer = self.transport(encode_body_input(hidden_states, attention_mask))
        output = decode_body_output(answer, hidden_states)  # (batch, new, hidden)
        return output.to(hidden_states.device)


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One token per row from the last position's logits (batch, vocab) → (batch,)."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature  # (batch, vocab)
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (batch, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (batch, vocab)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_through_split(
    split: SplitModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    body_step: BodyStep | None = None,
    config: object | None = None,
) -> torch.Tensor:
    """Prompt + new tokens, (batch, prompt + new); rows stop at EOS and are then padded like HF generate.

    `input_ids` may be left-padded (mark padding in `attention_mask`). `config` is the model config (for
    the caches); it defaults to the front's.
    """
    sampling = sampling or SamplingConfig()
    front, back = split.part("front"), split.part("back")
    config = config if config is not None else front.stack.config
    body = body_step if body_step is not None else LocalBody(split.part("body"), config)
    front_cache, back_cache = DynamicCache(config=config), DynamicCache(config=config)  # type: ignore[arg-type]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
    generator = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (batch,)
    new_ids = input_ids  # the prompt first, then one token per step
    for _ in range(sampling.max_new_tokens):
        hidden = front(new_ids, attention_mask, past_key_values=front_cache)  # (batch, new, hidden)
        hidden = body(hidden, attention_mask)  # (batch, new, hidden)
        logits = back(
            hidden, attention_mask, logits_to_keep=1, past_key_values=back_cache
        )  # (batch, 1, vocab)
        token = next_tokens(logits[:, -1, :], sampling, generator)  # (batch,)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        sequences = torch.cat([sequences, token[:, None]], dim=1)  # (batch, seq + 1)
        if eos_token_id is not None:
            unfinished &= token != eos_token_id
        if not bool(unfinished.any()):
            break
        new_ids = token[:, None]  # (batch, 1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], 1)
    return sequences


def complete_texts(
    split: SplitModel,
    tokenizer: Any,
    prompts: list[str],
    sampling: SamplingConfig,
    body_step: BodyStep | None = None,
) -> list[str]:
    """The completion (new text only) of each prompt, batched left-padded through `generate_through_split`."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    sequences = generate_through_split(
        split,
        encoded["input_ids"],
        encoded["attention_mask"],
        sampling,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0,
        body_step=body_step,
    )
    new_tokens = sequences[:, encoded["input_ids"].shape[1] :]  # (batch, new)
    return list(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))


_bundle_parts_lock = threading.Lock()  # one generation at a time: the parts' modules are shared, the CPU too
_bundle_parts: dict[str, tuple[SplitModel, str]] = {}  # bundle digest -> (front + back, model ref)


def _client_parts_for(bundle: bytes) -> tuple[SplitModel, str]:
    digest = hashlib.sha256(bundle).hexdigest()
    if digest not in _bundle_parts:
        parsed = read_export_bundle(bundle)
        _bundle_parts.clear()
        _bundle_parts[digest] = (client_parts_from_bundle(parsed), parsed.model_ref)
    return _bundle_parts[digest]


def complete_with_bundle(
    bundle: bytes, prompts: list[str], sampling: SamplingConfig, body_transport: BodyTransport
) -> list[str]:
    """The completion (new text only) of each prompt, with the front and back of an export bundle here and
    the body wherever `body_transport` sends it. The newest bundle's parts are kept (one at a time), so
    repeated requests do not reload them; another bundle (a new checkpoint or client average) reloads."""
    with _bundle_parts_lock:
        split, model_ref = _client_parts_for(bundle)
        return complete_texts(split, load_tokenizer(model_ref), prompts, sampling, RemoteBody(body_transport))
