"""Deterministic tiny random causal LMs of real transformers architectures, and a tiny BPE tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"
PAD_TOKEN_ID, EOS_TOKEN_ID = 0, 1  # special tokens come first in `train_tiny_tokenizer`
TINY_VOCAB_SIZE = 384

# Shared by every Llama-like config: 4 layers so a 1/2/1 split leaves the server 2 layers.
_LLAMA_LIKE: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "attention_dropout": 0.0,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": EOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "tie_word_embeddings": False,
}

# Each entry exercises something a split must get right; sliding windows are shorter than test sequences.
_ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 6},
    # Qwen2 with sliding layers on only the first 2 layers: a mix of full and sliding masks.
    "qwen2": {
        "use_sliding_window": True,
        "sliding_window": 6,
        "max_window_layers": 2,
        "tie_word_embeddings": True,
    },
    "qwen3": {"head_dim": 8},
    "glm": {"head_dim": 8, "partial_rotary_factor": 0.5},
    # Gemma2: scaled embeddings, alternating sliding/full layers, attention and final soft-capping, tied head.
    "gemma2": {
        "head_dim": 8,
        "sliding_window": 6,
        "query_pre_attn_scalar": 8,
        "final_logit_softcapping": 5.0,
        "attn_logit_softcapping": 10.0,
        "tie_word_embeddings": True,
    },
    "gpt2": {},
}
TINY_ARCHITECTURES: tuple[str, ...] = tuple(_ARCH_OVERRIDES)

_GPT2_BASE: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "n_embd": 32,
    "n_layer": 4,
    "n_head": 4,
    "n_positions": 128,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": EOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "tie_word_embeddings": True,
}

# Built-in text for the default tiny tokenizer (enough merges for a few hundred tokens).
TINY_CORPUS: tuple[str, ...] = (
    "Federated learning trains one model on data that never leaves its owners.",
    "The client keeps the input block and the output block; the server runs the middle layers.",
    "Hidden states cross the wire forward and gradients cross it backward, encrypted per client.",
    "The market rallied on Tuesday as investors weighed the latest earnings reports.",
    "Health officials urged people to get vaccinated before the flu season begins.",
    "A new study suggests that regular exercise improves sleep and reduces stress.",
    "The team won the championship after a dramatic final match that went to extra time.",
    "Researchers released a small language model that runs on a laptop without a GPU.",
    "Weather forecasters expect heavy rain and strong winds across the northern region this weekend.",
    "The city council approved a plan to build new bike lanes and expand public transport.",
)


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of `arch` (see TINY_ARCHITECTURES); keyword overrides win."""
    if arch not in _ARCH_OVERRIDES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {list(TINY_ARCHITECTURES)}")
    base = _GPT2_BASE if arch == "gpt2" else _LLAMA_LIKE
    return AutoConfig.for_model(arch, **{**base, **_ARCH_OVERRIDES[arch], **overrides})


def build_tiny_model(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM; the same (arch, seed, overrides) gives identical weights."""
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def train_tiny_tokenizer(
    texts: Iterable[str] = TINY_CORPUS, vocab_size: int = TINY_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` with `<pad>` = 0, `<eos>` = 1; same input, same tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
