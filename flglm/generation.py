"""Text generation through the split model with a KV cache in every part (front, body, back).

Each part keeps its own `DynamicCache` (built from the model config, so it addresses layers by their index in
the whole model and fills only its own), which is what lets the body's cache live on another machine than the
client's front and back caches. Per step only the new position's hidden state (batch, 1, hidden) and the
growing attention mask cross the cut, as in training.

`generate_through_split` takes the body as a `BodyStep` callable, `(hidden_states, attention_mask) ->
hidden_states`: `LocalBody` runs the server body in-process with its cache; a remote body (a worker) would
keep its cache per generation session and is called the same way. Greedy decoding equals the unsplit
model's `generate(do_sample=False)` token for token (tests), with the same EOS/padding rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from flglm.split import ServerBody, SplitModel

BodyStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LocalBody:
    """The server body run in this process, with its own KV cache (one per generation)."""

    def __init__(self, body: ServerBody, config: object) -> None:
        self.body = body
        self.cache = DynamicCache(config=config)  # type: ignore[arg-type]

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(hidden_states, attention_mask, past_key_values=self.cache)  # (batch, new, hidden)


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when `do_sample` is False; otherwise temperature + top-k sampling from a seeded generator."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps the whole vocabulary
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


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
