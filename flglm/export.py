"""Export a split job's adapters as a standard PEFT adapter for the unsplit model, optionally merged.

The client (front + back) and server (body) adapters are named after the split parts
(`front.stack.layers.0.self_attn.q_proj.lora_A.default.weight`, `stack.layers.1.mlp.up_proj...`). The parts
share their modules with the whole model, so after injecting the adapters into the parts the *whole*
model's `named_parameters` hold the same tensors under the unsplit names; we map each part name to the whole
model's name through that identity, never by string surgery on layer indices.

The output directory is what `PeftModel.from_pretrained(base, out_dir)` loads: `adapter_config.json`
(LoRA, the adapted modules by their full unsplit names) and `adapter_model.safetensors` (keys in peft's
saved form, `base_model.model.<module>.lora_A.weight`). With `merge=True` the merged full model (and the
tokenizer) is also written to `<out_dir>/merged` with `save_pretrained`: a separate directory, because
transformers would otherwise load the adapter on top of the already-merged weights.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from flglm.adapters import AdapterSpec, add_split_adapters, load_trainable_state_dict
from flglm.models import load_model, load_split_parts, load_tokenizer, resolve_model_ref
from flglm.split import SplitModel, SplitPlan, split_model

ADAPTER_NAME = "default"  # the adapter name `inject_adapter_in_model` uses, dropped in peft's saved keys
MERGED_DIRNAME = "merged"
BUNDLE_FORMAT = "flglm-export/1"  # written by backend.exports.service (torch-free)


def unsplit_adapter_state(
    model: nn.Module,
    plan: SplitPlan,
    adapter_cfg: AdapterSpec,
    front_back_state: Mapping[str, torch.Tensor],
    body_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Inject the job's adapters into `model` through its split, load both states, return them unsplit.

    Returns the LoRA tensors keyed by the whole model's parameter names and the full names of the
    adapted modules. `model` keeps the adapters (it is the split model's reference afterwards).
    """
    split = add_split_adapters(split_model(model, plan), adapter_cfg, seed=0)
    load_trainable_state_dict(split.as_module_dict(["front", "back"]), front_back_state)
    load_trainable_state_dict(split.part("body"), body_state)
    names_by_tensor = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    unsplit: dict[str, torch.Tensor] = {}
    for parameter in split.as_module_dict().parameters():
        if parameter.requires_grad:
            unsplit[names_by_tensor[id(parameter)]] = parameter.detach().cpu().clone()
    adapted = sorted({name.split(".lora_")[0] for name in unsplit})
    return unsplit, adapted


def peft_saved_key(parameter_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A.default.weight` → `base_model.model.` + it minus `.default`."""
    return "base_model.model." + parameter_name.replace(f".{ADAPTER_NAME}.", ".")


def export_peft_adapter(
    model_ref: str,
    plan: SplitPlan,
    adapter_cfg: AdapterSpec,
    front_back_state: Mapping[str, torch.Tensor],
    body_state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    merge: bool = False,
) -> Path:
    """Write a PEFT adapter dir for the unsplit `model_ref` (and `<out_dir>/merged` when `merge`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_ref)
    unsplit, adapted = unsplit_adapter_state(model, plan, adapter_cfg, front_back_state, body_state)
    if not unsplit:
        raise ValueError(f"nothing to export: adapter parts {adapter_cfg.parts} adapt no module of the model")
    lora = LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=adapted,
        # GPT-2's Conv1D stores weights transposed; peft needs to know, as in flglm.adapters.add_adapters.
        fan_in_fan_out=any(isinstance(model.get_submodule(name), Conv1D) for name in adapted),
        bias="none",
        task_type="CAUSAL_LM",
        # A local directory when the ref has one (SmolLM2's cached safetensors, a user's HF dir), so that
        # `AutoPeftModelForCausalLM.from_pretrained(out_dir)` finds the base offline; tiny refs keep the ref.
        base_model_name_or_path=str(resolve_model_ref(model_ref).directory or model_ref),
    )
    lora.save_pretrained(str(out))
    tensors = {peft_saved_key(name): t.contiguous() for name, t in unsplit.items()}
    metadata = {"format": "pt", "flglm_plan": json.dumps(plan.__dict__), "flglm_model_ref": model_ref}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata=metadata)
    if merge:
        # Through peft's own loader: the merged weights are exactly what a user of the adapter dir gets.
        merged = PeftModel.from_pretrained(load_model(model_ref), str(out)).merge_and_unload()
        merged.save_pretrained(str(out / MERGED_DIRNAME))
        # A model without a local tokenizer still exports its weights.
        with contextlib.suppress(OSError, ValueError):
            load_tokenizer(model_ref).save_pretrained(str(out / MERGED_DIRNAME))
    return out


@dataclass(frozen=True)
class ExportBundle:
    """What `GET /jobs/{id}/export` returns, parsed: the job's model and both adapter sets."""

    model_ref: str
    plan: SplitPlan
    adapter_cfg: AdapterSpec
    front_back_state: dict[str, torch.Tensor]
    body_state: dict[str, torch.Tensor]
    # A private_front job: the input-block adapters stayed with the data owners (`adapter_cfg.parts` lacks
    # "front", so the model built from this bundle has the public input block); `note` says it in words.
    private_front: bool = False
    note: str | None = None


def read_export_bundle(data: bytes) -> ExportBundle:
    """Parse a bundle (safetensors: no pickle) or raise ValueError naming what is wrong."""
    if len(data) < 8:
        raise ValueError("export bundle is empty or truncated")
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise ValueError("export bundle is not a safetensors file") from None
    if metadata.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"not an FL-GLM export bundle (format {metadata.get('format')!r})")
    tensors = load(data)
    plan_fields = json.loads(metadata["split_plan"])
    return ExportBundle(
        model_ref=metadata["model_ref"],
        plan=SplitPlan(int(plan_fields["front_layers"]), int(plan_fields["back_layers"])),
        adapter_cfg=AdapterSpec(**json.loads(metadata["adapter"])),
        front_back_state={k[len("client/") :]: t for k, t in tensors.items() if k.startswith("client/")},
        body_state={k[len("body/") :]: t for k, t in tensors.items() if k.startswith("body/")},
        private_front=json.loads(metadata.get("private_front", "false")) is True,
        note=metadata.get("note"),
    )


def split_from_bundle(bundle: ExportBundle) -> SplitModel:
    """The job's split model with its trained adapters loaded (all three parts, in this process)."""
    split = add_split_adapters(split_model(load_model(bundle.model_ref), bundle.plan), bundle.adapter_cfg, 0)
    load_trainable_state_dict(split.as_module_dict(["front", "back"]), bundle.front_back_state)
    load_trainable_state_dict(split.part("body"), bundle.body_state)
    split.as_module_dict().eval()
    return split


def client_parts_from_bundle(bundle: ExportBundle) -> SplitModel:
    """Only the front and back with the job's global client adapters (the caller's half of remote-body
    generation; only their weights are read from disk). The body is None: a worker runs it."""
    split = load_split_parts(bundle.model_ref, bundle.plan, parts={"front", "back"})
    add_split_adapters(split, bundle.adapter_cfg, 0)
    load_trainable_state_dict(split.as_module_dict(["front", "back"]), bundle.front_back_state)
    split.as_module_dict().eval()
    return split
