"""`flglm job init`: a commented YAML job file with every `JobSpec` field, its default, bounds and meaning.

Walked from the pydantic models themselves (fields, defaults, bounds, enum values; a field's `description`
when it has one, else its note here), so a new field shows up at once and tests/backend/test_job_spec_cli.py
fails until it has a meaning.
"""

from __future__ import annotations

import enum
import json
import re
import textwrap
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from flglm.contracts.validation_errors import allowed_values, pattern_choices
from flglm.protocol import JobSpec, TaskType

# Meanings of the fields that carry no `description` in their model (keyed by model, then field).
NOTES: dict[str, dict[str, str]] = {
    "JobSpec": {
        "name": "a name for the job, shown to the data owners in their invitation",
        "model_ref": "the base model: tiny:<arch>[:seed] (tiny random model, for trials), smollm2-135m, "
        "a local directory or a Hugging Face id; every agent and worker must be able to load it",
        "task_type": "generation (learn the text) or classification (learn a label per text)",
        "split_plan": "how the model is split between the data owners and the server",
        "adapter": "the LoRA adapters that are trained (the base model stays frozen)",
        "hyperparameters": "optimizer, data, evaluation and engine settings",
        "parallel_mode": "sequential (one client step at a time), client_batch (the server batches the "
        "clients' activations), server_hierarchical (clients dealt to `replicas` server replicas)",
        "replicas": "server replicas; more than 1 needs parallel_mode server_hierarchical",
        "rounds": "federated rounds; the clients' adapters are FedAvg'd at the end of each",
        "steps_per_round": "training steps each client takes per round",
        "min_clients": "approved, online clients needed to start, and to finish a round",
        "round_timeout_s": "seconds a round may take before its stragglers are handled (straggler_policy)",
        "straggler_policy": "at a round's deadline: drop unfinished clients (if min_clients finished) "
        "or fail",
        "privacy": "what each data owner's agent does to every tensor before it leaves",
    },
    "SplitPlanSpec": {
        "front_layers": "transformer blocks in the data owner's input block (with the embeddings)",
        "back_layers": "transformer blocks in the data owner's output block (with the LM head and loss)",
    },
    "AdapterSpec": {
        "method": "adapter kind (only lora)",
        "r": "LoRA rank",
        "alpha": "LoRA alpha (the update is scaled by alpha / r)",
        "dropout": "LoRA dropout",
        "target_modules": "all-linear, or a list of module names to adapt",
        "parts": "which split parts get adapters",
    },
    "Hyperparameters": {
        "lr": "learning rate (AdamW)",
        "weight_decay": "AdamW weight decay",
        "betas": "AdamW betas",
        "eps": "AdamW epsilon",
        "warmup_steps": "linear learning-rate warm-up steps",
        "total_steps": "when set, the learning rate decays linearly to 0 at this step",
        "bf16_autocast": "bfloat16 autocast on CPU: faster with native bf16 support, much slower without",
        "score_only_targets": "run the LM head only where a label exists (saves time, same loss)",
        "seed": "seed of the public adapter init, the data split and sampling",
        "batch_size": "examples per client step",
        "max_seq_len": "tokens per example: agents truncate to it, workers refuse longer",
        "eval_fraction": "share of each client's data held out locally for evaluation, never trained on",
        "eval_examples": "held-out examples evaluated after each round (0: no evaluation)",
        "eval_max_new_tokens": "generation jobs' round evaluation: tokens generated per example",
        "labels": "classification: the label set (null: the labels found in each client's data)",
        "template": "classification: how a text becomes a prompt ({text} is replaced by the text)",
        "max_batch_size": "worker: rows per forward group",
        "checkpoint_every": "worker: server steps between checkpoints (plus one at each round's end)",
        "server_fedavg_every": "server_hierarchical: server steps between the replicas' FedAvg",
        "batch_window_s": "batch modes: seconds a batch waits for the other clients",
        "exchange_timeout_s": "server_hierarchical: seconds to wait for peer replicas' exchange",
        "inflight_timeout_s": "seconds before an unanswered step is dropped",
        "max_pending": "forwards queued behind the step in flight",
        "blob_ttl_s": "seconds the server keeps step messages and checkpoints",
    },
    "PrivacySpec": {"wire_dtype": "dtype of the tensors on the wire"},
}
EXAMPLES: dict[TaskType, dict[str, Any]] = {
    TaskType.classification: {
        "name": "my-classifier",
        "model_ref": "smollm2-135m",
        "task_type": TaskType.classification,
        "hyperparameters": {"labels": ["negative", "positive"]},
    },
    TaskType.generation: {
        "name": "my-generator",
        "model_ref": "smollm2-135m",
        "task_type": TaskType.generation,
    },
}
WIDTH = 100
_PLAIN = re.compile(r"[A-Za-z_][\w./:-]*")


def meaning(model: type[BaseModel], name: str, info: FieldInfo) -> str | None:
    """A field's description, else its note; None when it has neither (a test forbids that)."""
    return info.description or NOTES.get(model.__name__, {}).get(name)


def render(value: Any) -> str:
    """`value` as a one-line YAML flow scalar or sequence that `yaml.safe_load` reads back as it is."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        text = repr(value)  # PyYAML reads 1e-08 as a string: it needs a dot in the mantissa
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render(item) for item in value) + "]"
    if isinstance(value, str) and _PLAIN.fullmatch(value) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _bounds(info: FieldInfo) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    parts = []
    for item in info.metadata:
        for attribute, symbol in symbols.items():
            bound = getattr(item, attribute, None)
            if bound is not None and isinstance(item, annotated_types.BaseMetadata):
                parts.append(f"{symbol}{render(bound)}")
    return ", ".join(parts)


def _submodel(info: FieldInfo) -> type[BaseModel] | None:
    annotation = info.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _lines(model: type[BaseModel], values: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    for name, info in model.model_fields.items():
        sub = _submodel(info)
        note = meaning(model, name, info) or ((sub.__doc__ or "").split("\n")[0] if sub else "")
        facts = []
        if info.is_required():
            facts.append("required")
        elif sub is None:
            facts.append(f"default {render(info.get_default(call_default_factory=True))}")
        patterns = [getattr(item, "pattern", None) for item in info.metadata]
        allowed = allowed_values(info.annotation) or next(
            (choices for p in patterns if isinstance(p, str) and (choices := pattern_choices(p))), None
        )
        if allowed:
            facts.append("one of " + " | ".join(allowed))
        if bounds := _bounds(info):
            facts.append(bounds)
        for comment in (note, "; ".join(facts)):
            lines += [f"{indent}# {line}" for line in textwrap.wrap(comment, WIDTH - len(indent) - 2)]
        if sub is not None:
            lines.append(f"{indent}{name}:")
            lines += _lines(sub, values.get(name, {}), indent + "  ")
            continue
        value = values[name] if name in values else info.get_default(call_default_factory=True)
        lines.append(f"{indent}{name}: {render(value)}")
    return lines


def job_template(task: TaskType) -> str:
    """The commented YAML job file for `task`: every field at its default but a few example values."""
    header = [
        f"# A {task.value} job for FL-GLM: `flglm job submit job.yaml --open`. A mistake is refused",
        "# before anything is sent, naming the field. Every field is listed at its default; delete what",
        "# you do not change. Written by `flglm job init` from the job spec's models.",
    ]
    return "\n".join([*header, *_lines(JobSpec, EXAMPLES[task], "")]) + "\n"
