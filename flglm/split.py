"""Three-way split of a Hugging Face decoder-only causal LM: client front, server body, client back.

The parts reuse the model's own modules (embeddings, decoder layers, norm, rotary embedding, LM head) and
its own mask builders from `transformers.masking_utils`; nothing here re-implements attention. Each part
derives position ids, masks and rotary embeddings from `attention_mask` alone, because hidden states and
the attention mask are all that crosses the wire.

Position ids are `cumsum(attention_mask) - 1` clamped at 0 (what `generate` uses), so left-padded rows see
their first real token at position 0. The unsplit model matches the split one exactly when it is given the
same `position_ids` (see `position_ids_from_attention_mask`); without padding both equal `arange(seq)`.

Two layouts are recognised: `model.embed_tokens / layers / norm / rotary_emb` (Llama, Mistral, Qwen2,
Gemma2, Glm, ...) and GPT-2's `wte / wpe / h / ln_f`. Per-layer attention types come from
`config.layer_types` (full or sliding window) or, without it, from `config.sliding_window` (Mistral style).
Embedding scaling lives in the embedding module of the models that scale (Gemma's scaled embedding), and
`config.final_logit_softcapping` / tied embeddings are honoured in the back part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import nn
from transformers import Cache, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from flglm.contracts.job_settings import PART_NAMES as PART_NAMES
from flglm.contracts.job_settings import PartName as PartName

LayoutName = Literal["llama", "gpt2"]
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
UNSUPPORTED_SCALING_ATTRS = ("embedding_multiplier", "logits_scaling", "logit_scale")


@dataclass(frozen=True)
class SplitPlan:
    """How many decoder layers the client keeps before (front) and after (back) the server's body."""

    front_layers: int = 1
    back_layers: int = 1

    def __post_init__(self) -> None:
        # Zero client layers would put raw token embeddings on the wire, which are trivially invertible.
        if self.front_layers < 1 or self.back_layers < 1:
            raise ValueError(
                f"SplitPlan(front_layers={self.front_layers}, back_layers={self.back_layers}): each client "
                "part needs at least 1 decoder layer, or raw embeddings / final hidden states leave it"
            )

    def validate_for(self, num_layers: int) -> None:
        """Raise ValueError unless the plan leaves the server at least one of `num_layers` layers."""
        client_layers = self.front_layers + self.back_layers
        if client_layers >= num_layers:
            raise ValueError(
                f"SplitPlan(front_layers={self.front_layers}, back_layers={self.back_layers}) keeps "
                f"{client_layers} layers on the client but the model has only {num_layers}: the server body "
                f"would get {num_layers - client_layers} layers; "
                f"need front_layers + back_layers < {num_layers}"
            )

    def body_range(self, num_layers: int) -> range:
        """Indices of the decoder layers that the server body runs."""
        self.validate_for(num_layers)
        return range(self.front_layers, num_layers - self.back_layers)


def positions_of_new_tokens(attention_mask: torch.Tensor | None, seq_len: int, past: int) -> torch.Tensor:
    """Position ids of the last `seq_len` tokens with `past` cached; the mask covers all of them."""
    if attention_mask is None:
        return torch.arange(past, past + seq_len).unsqueeze(0)  # (1, seq)
    return position_ids_from_attention_mask(attention_mask, attention_mask.shape[1])[:, -seq_len:]


def position_ids_from_attention_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them; (batch or 1, seq)."""
    if attention_mask is None:
        return torch.arange(seq_len).unsqueeze(0)  # (1, seq)
    positions = attention_mask.long().cumsum(-1) - 1  # (batch, seq)
    return positions.clamp(min=0)


@dataclass(frozen=True)
class DecoderLayout:
    """Where a supported model keeps its pieces, found once by `find_decoder_layout`."""

    name: LayoutName
    base: nn.Module  # the model without its LM head (`model.model`, `model.transformer`)
    layers: nn.ModuleList
    layer_types: tuple[str, ...]
    lm_head: nn.Module


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """Locate embeddings, layer stack and norm, or raise TypeError saying what is missing."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"split_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    kind = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{kind} is an encoder-decoder model; only decoder-only causal LMs can be split")
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, nn.Module):
        raise TypeError(f"{kind} has no LM head (get_output_embeddings() is None); it is not a causal LM")
    # These scale embeddings or logits in the model's forward, outside any module a part could reuse.
    outside_scaling = [a for a in UNSUPPORTED_SCALING_ATTRS if getattr(config, a, None) not in (None, 1, 1.0)]
    if outside_scaling:
        raise TypeError(f"{kind} scales activations outside its modules ({outside_scaling}); cannot split it")
    base = model.base_model
    if all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm")):
        name: LayoutName = "llama"
        layers = base.layers
        if not hasattr(base, "rotary_emb"):
            raise TypeError(f"{kind}: layer stack found but no rotary_emb; its position handling is unknown")
    elif all(hasattr(base, name) for name in ("wte", "wpe", "h", "ln_f")):
        name = "gpt2"
        layers = base.h
    else:
        raise TypeError(
            f"{kind} has neither the `embed_tokens/layers/norm/rotary_emb` nor the GPT-2 `wte/wpe/h/ln_f` "
            f"layout of a decoder-only causal LM (base model {type(base).__name__}); cannot split it"
        )
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{kind}: decoder layers are a {type(layers).__name__}, expected nn.ModuleList")
    return DecoderLayout(
        name=name, base=base, layers=layers, layer_types=_layer_types(model, len(layers)), lm_head=lm_head
    )


def _layer_types(model: nn.Module, num_layers: int) -> tuple[str, ...]:
    """Attention type per layer, the way the model's own forward picks its mask."""
    config = model.config
    declared = getattr(config, "layer_types", None)
    if declared is not None:
        types = tuple(declared[:num_layers])
    elif getattr(config, "sliding_window", None) is not None:
        types = ("sliding_attention",) * num_layers  # Mistral / Phi-3: one sliding mask for every layer
    else:
        types = ("full_attention",) * num_layers
    unknown = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        raise TypeError(
            f"{type(model).__name__} has layer types {unknown}; "
            f"only {list(SUPPORTED_LAYER_TYPES)} can be split"
        )
    return types


class DecoderStack(nn.Module):
    """A contiguous run of the model's own decoder layers, with masks and positions from `attention_mask`."""

    def __init__(
        self,
        config: Any,
        layout: LayoutName,
        layers: Sequence[nn.Module],
        layer_types: Sequence[str],
        rotary_emb: nn.Module | None,
        layer_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        self.layers = nn.ModuleList(layers)
        self.layer_types = tuple(layer_types)
        self.rotary_emb = rotary_emb
        # Indices in the whole model: a KV cache addresses layers by them (the attention's own `layer_idx`).
        self.layer_indices = tuple(layer_indices) if layer_indices is not None else tuple(range(len(layers)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """With `past_key_values` (generation), `hidden_states` are the new positions only and
        `attention_mask` covers past + new positions, as in HF `generate`; the cache is updated in place."""
        seq_len = hidden_states.shape[1]  # (batch, seq, hidden)
        position_ids = positions_of_new_tokens(attention_mask, seq_len, self.past_length(past_key_values))
        position_ids = position_ids.to(hidden_states.device)  # (batch or 1, seq)
        masks = self._masks(hidden_states, attention_mask, position_ids, past_key_values)
        layer_kwargs: dict[str, Any] = {"position_ids": position_ids}
        if past_key_values is not None:
            layer_kwargs.update(past_key_values=past_key_values, use_cache=True)
        if self.rotary_emb is not None:
            layer_kwargs["position_embeddings"] = self.rotary_emb(hidden_states, position_ids)  # (cos, sin)
        for layer, layer_type in zip(self.layers, self.layer_types, strict=True):
            output = layer(hidden_states, attention_mask=masks[layer_type], **layer_kwargs)
            hidden_states = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
        return hidden_states

    def past_length(self, past_key_values: Cache | None) -> int:
        """Positions this stack's layers have cached (0 without a cache)."""
        if past_key_values is None or not self.layer_indices:
            return 0
        return int(past_key_values.get_seq_length(self.layer_indices[0]))

    def _masks(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        past_key_values: Cache | None = None,
    ) -> dict[str, Any]:
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": hidden_states,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
        }
        builders = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        masks: dict[str, Any] = {}
        for layer_type, build in builders.items():
            if layer_type in self.layer_types:
                # Size the mask by one of *this* stack's cached layers: a part's cache fills only its own.
                first = self.layer_indices[self.layer_types.index(layer_type)]
                layer_idx = first if past_key_values is not None else None
                masks[layer_type] = build(**mask_kwargs, layer_idx=layer_idx)  # type: ignore[operator]
        return masks


class ClientFront(nn.Module):
    """Input block: token (and GPT-2 position) embeddings plus the first decoder layers."""

    def __init__(
        self,
        embed_tokens: nn.Module,
        stack: DecoderStack,
        position_embedding: nn.Module | None = None,
        embed_dropout: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.position_embedding = position_embedding
        self.embed_dropout = embed_dropout
        self.stack = stack

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # (batch, seq, hidden), scaled here for Gemma
        if self.position_embedding is not None:
            past = self.stack.past_length(past_key_values)
            position_ids = positions_of_new_tokens(attention_mask, input_ids.shape[1], past)
            hidden_states = hidden_states + self.position_embedding(position_ids.to(input_ids.device))
        if self.embed_dropout is not None:
            hidden_states = self.embed_dropout(hidden_states)
        return self.stack(hidden_states, attention_mask, past_key_values)  # (batch, seq, hidden)


class ServerBody(nn.Module):
    """The middle decoder layers that run on the server."""

    def __init__(self, stack: DecoderStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        return self.stack(hidden_states, attention_mask, past_key_values)  # (batch, seq, hidden)


class ClientBack(nn.Module):
    """Output block: the last decoder layers, the final norm and the LM head (with soft-capping if any)."""

    def __init__(
        self,
        stack: DecoderStack,
        norm: nn.Module,
        lm_head: nn.Module,
        final_logit_softcapping: float | None = None,
    ) -> None:
        super().__init__()
        self.stack = stack
        self.norm = norm
        self.lm_head = lm_head
        self.final_logit_softcapping = final_logit_softcapping

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        hidden_states = self.stack(hidden_states, attention_mask, past_key_values)  # (batch, seq, hidden)
        hidden_states = self.norm(hidden_states)
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            # A (batch, seq) mask keeps those tokens only: (n_kept, vocab), one row per True, row-major.
            logits = self.lm_head(hidden_states[logits_to_keep])
        else:
            # Like HF: an int keeps the last n positions (0 keeps all), a tensor indexes positions.
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])  # (batch, kept, vocab)
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


@dataclass
class SplitModel:
    """The three parts; a part is None when this process did not build it (see flglm.models)."""

    front: ClientFront | None
    body: ServerBody | None
    back: ClientBack | None
    plan: SplitPlan
    num_layers: int

    @overload
    def part(self, name: Literal["front"]) -> ClientFront: ...
    @overload
    def part(self, name: Literal["body"]) -> ServerBody: ...
    @overload
    def part(self, name: Literal["back"]) -> ClientBack: ...
    @overload
    def part(self, name: PartName) -> nn.Module: ...
    def part(self, name: PartName) -> nn.Module:
        """The named part, or a clear error when this process does not hold it."""
        module = getattr(self, name)
        if module is None:
            raise ValueError(f"this SplitModel was built without its {name!r} part")
        return module

    def present_parts(self) -> dict[PartName, nn.Module]:
        """The parts this process holds, by name."""
        return {name: getattr(self, name) for name in PART_NAMES if getattr(self, name) is not None}

    def as_module_dict(self, parts: Sequence[PartName] | None = None) -> nn.ModuleDict:
        """The held parts (or the named ones) as one module, e.g. for a client's state dict or optimizer."""
        held = self.present_parts()
        names = list(held) if parts is None else list(parts)
        return nn.ModuleDict({name: self.part(name) for name in names})

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Run front → body → back in-process; equals the unsplit model's logits."""
        front, body, back = self.part("front"), self.part("body"), self.part("back")
        hidden_states = body(front(input_ids, attention_mask), attention_mask)  # (batch, seq, hidden)
        return back(hidden_states, attention_mask, logits_to_keep=logits_to_keep)  # (batch, kept, vocab)


def split_model(
    model: nn.Module, plan: SplitPlan | None = None, parts: Sequence[PartName] | set[PartName] = PART_NAMES
) -> SplitModel:
    """Split `model` into front/body/back sharing its modules (no copies); omit parts not in `parts`."""
    plan = plan or SplitPlan()
    layout = find_decoder_layout(model)
    num_layers = len(layout.layers)
    body_range = plan.body_range(num_layers)
    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        raise ValueError(f"unknown split parts {sorted(unknown)}; choose from {list(PART_NAMES)}")
    config = model.config
    base: Any = layout.base
    rotary = getattr(base, "rotary_emb", None) if layout.name == "llama" else None

    def stack(indices: range) -> DecoderStack:
        return DecoderStack(
            config,
            layout.name,
            [layout.layers[i] for i in indices],
            [layout.layer_types[i] for i in indices],
            rotary,
            layer_indices=indices,
        )

    front = back = body = None
    if "front" in parts:
        front_stack = stack(range(0, body_range.start))
        if layout.name == "gpt2":
            front = ClientFront(base.wte, front_stack, position_embedding=base.wpe, embed_dropout=base.drop)
        else:
            front = ClientFront(base.embed_tokens, front_stack)
    if "body" in parts:
        body = ServerBody(stack(body_range))
    if "back" in parts:
        norm = base.ln_f if layout.name == "gpt2" else base.norm
        lm_head = layout.lm_head
        softcap = getattr(config, "final_logit_softcapping", None)
        back = ClientBack(stack(range(body_range.stop, num_layers)), norm, lm_head, softcap)
    return SplitModel(front=front, body=body, back=back, plan=plan, num_layers=num_layers)
