"""LoRA adapters (via peft) on split parts, their state dicts, FedAvg, and the P-tuning v2 wire cost.

`add_adapters` injects LoRA into any nn.Module (a split part or a whole model), freezes the base weights and
draws the LoRA init from its own seed, so every client (and the worker) starts from identical adapters no
matter which other parts exist in its process. Because split parts share modules with the model they were cut
from, adapters added to the parts are also seen by that model: that is how the centralized reference and the
split trainer start from the same adapters.

P-tuning v2 is not offered as a trainer: in the paper's code the client owns a prefix for *every* server
layer and ships its key/values each step (56.6 MB per sample at ChatGLM-6B scale, see
`ptuning_v2_wire_bytes_per_sample`), while our protocol moves only (batch, seq, hidden) activations and the
attention mask. Prefixes for the server layers would therefore live on the server as server-side adapters,
which is what LoRA on the body already gives at a fraction of the traffic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from flglm.contracts.job_settings import ALL_LINEAR, AdapterSpec
from flglm.split import PART_NAMES, PartName, SplitModel

# The LM head is a vocabulary-sized projection (tied to the embeddings in many models): never adapted by
# "all-linear", as in peft.
_EXCLUDED_FROM_ALL_LINEAR = ("lm_head",)


def linear_module_names(module: nn.Module) -> list[str]:
    """Names of the Linear / GPT-2 Conv1D modules of `module`, minus the LM head (what 'all-linear' means)."""
    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear | Conv1D) and name.split(".")[-1] not in _EXCLUDED_FROM_ALL_LINEAR
    ]


def _resolve_targets(module: nn.Module, cfg: AdapterSpec) -> list[str]:
    """Full module names to adapt; a listed name matches a module whose name ends with it."""
    candidates = linear_module_names(module)
    if cfg.target_modules == ALL_LINEAR:
        return candidates
    all_names = [name for name, _ in module.named_modules()]
    wanted = [n for n in all_names if any(n == t or n.endswith("." + t) for t in cfg.target_modules)]
    if not wanted:
        raise ValueError(
            f"target_modules {cfg.target_modules} match no module of {type(module).__name__}; "
            f"its linear modules are e.g. {sorted({n.split('.')[-1] for n in candidates})}"
        )
    return wanted


def add_adapters(module: nn.Module, cfg: AdapterSpec, seed: int) -> nn.Module:
    """Freeze `module`'s weights and inject LoRA; the same seed gives the same initial adapters."""
    targets = _resolve_targets(module, cfg)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    if not targets:  # e.g. a part with no linear layer: nothing to adapt, everything stays frozen
        return module
    # Conv1D (GPT-2) stores its weight transposed: peft needs fan_in_fan_out to compute the update right.
    fan_in_fan_out = any(isinstance(module.get_submodule(t), Conv1D) for t in targets)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora, module)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return module


def part_seed(seed: int, part: PartName) -> int:
    """Seed of one part's adapters, independent of which other parts a process holds."""
    return seed * 1009 + PART_NAMES.index(part)


def add_split_adapters(split: SplitModel, cfg: AdapterSpec, seed: int) -> SplitModel:
    """Add adapters to the parts named in `cfg.parts` that this process holds; freeze all the others."""
    for name, module in split.present_parts().items():
        if name in cfg.parts:
            add_adapters(module, cfg, part_seed(seed, name))
        else:
            for parameter in module.parameters():
                parameter.requires_grad_(False)
    return split


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should update, each once (tied weights appear once)."""
    return [p for p in module.parameters() if p.requires_grad]


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters, by name: what a client ships for FedAvg."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the trainable parameters; names and shapes must match exactly."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not match {type(module).__name__}: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    wrong = [
        f"{n}: {tuple(state[n].shape)} != {tuple(p.shape)}"
        for n, p in params.items()
        if state[n].shape != p.shape
    ]
    if wrong:
        raise ValueError(f"adapter state has wrong shapes: {wrong[:5]} ({len(wrong)} in all)")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(state[name].to(dtype=parameter.dtype, device=parameter.device))


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts (e.g. by sample count); keys and shapes must agree."""
    if not states:
        raise ValueError("fedavg needs at least one state dict")
    if len(states) != len(weights):
        raise ValueError(f"fedavg got {len(states)} state dicts but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fedavg weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = set(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            diff = sorted(keys.symmetric_difference(state))
            raise ValueError(f"fedavg: state {index} has different keys from state 0: {diff[:5]}")
        for key in keys:
            if state[key].shape != states[0][key].shape:
                raise ValueError(
                    f"fedavg: {key!r} has shape {tuple(state[key].shape)} in state {index} "
                    f"but {tuple(states[0][key].shape)} in state 0"
                )
    total = float(sum(weights))
    averaged: dict[str, torch.Tensor] = {}
    for key in states[0]:
        # Accumulate in float64 so the average does not depend on the order of clients.
        acc = sum(state[key].double() * (w / total) for state, w in zip(states, weights, strict=True))
        averaged[key] = torch.as_tensor(acc).to(states[0][key].dtype)
    return averaged


def ptuning_v2_wire_bytes_per_sample(
    config: Any, prefixed_layers: int, pre_seq_len: int = 128, bytes_per_value: int = 2
) -> int:
    """Bytes of prefix keys+values a P-tuning v2 client sends per sample for `prefixed_layers` server layers.

    Each prefixed layer needs a key and a value of shape (pre_seq_len, kv_heads * head_dim). The paper's
    ChatGLM-6B setting (hidden 4096, 27 prefixed layers, pre_seq_len 128, fp16) gives 56,623,104 bytes.
    """
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if prefixed_layers < 0 or pre_seq_len < 1 or bytes_per_value < 1:
        raise ValueError(
            f"need prefixed_layers >= 0, pre_seq_len >= 1, bytes_per_value >= 1; got "
            f"{prefixed_layers}, {pre_seq_len}, {bytes_per_value}"
        )
    return prefixed_layers * 2 * pre_seq_len * kv_heads * head_dim * bytes_per_value
