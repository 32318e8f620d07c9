"""A job's typed settings, with their defaults in one place: `AdapterSpec`, `TrainConfig`, `Hyperparameters`.

The operator submits them in a job (`flglm.protocol.JobSpec`); the backend stores what was set, the agent
reads the data and optimizer settings, the worker the optimizer and engine settings, each through these
models, so a setting means the same everywhere and an unknown one is refused at submission (422).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from flglm.contracts.request_model import StrictModel

PartName = Literal["front", "body", "back"]
PART_NAMES: tuple[PartName, ...] = ("front", "body", "back")
ALL_LINEAR: Literal["all-linear"] = "all-linear"
DEFAULT_CLASSIFICATION_TEMPLATE = "Text: {text}\nLabel:"


class AdapterSpec(StrictModel):
    """Which adapter, its size, which modules and which split parts get it (`kind` is read as `method`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    method: Literal["lora"] = Field(default="lora", validation_alias=AliasChoices("method", "kind"))
    r: int = Field(default=8, ge=1, le=4096)
    alpha: int = Field(default=16, gt=0, le=1_000_000)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = ALL_LINEAR
    parts: list[PartName] = Field(default_factory=lambda: list(PART_NAMES))

    @field_validator("parts")
    @classmethod
    def _parts_unique(cls, parts: list[PartName]) -> list[PartName]:
        if len(set(parts)) != len(parts):
            raise ValueError(f"adapter parts must be unique, got {parts}")
        return parts


class TrainConfig(BaseModel):
    """Optimizer, schedule and precision; shared by every trainer so their losses are comparable."""

    model_config = ConfigDict(allow_inf_nan=False)

    lr: float = Field(default=2e-4, gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0, le=1)
    warmup_steps: int = Field(default=0, ge=0, le=10_000_000)
    total_steps: int | None = Field(default=None, ge=1, le=10_000_000)  # set → linear decay to 0 there
    bf16_autocast: bool = False  # ~1.7x faster on a CPU with native bf16, ~5x slower without
    score_only_targets: bool = True  # run the LM head only where a label exists (logits_to_keep)


class Hyperparameters(TrainConfig, StrictModel):
    """Everything a job's `hyperparameters` may set: optimizer (`TrainConfig`), data, evaluation, engine."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # The data owner's side.
    seed: int = Field(default=0, ge=0, le=2**31 - 1)  # public adapter init, data split, sampling
    batch_size: int = Field(default=8, ge=1, le=4096)
    max_seq_len: int = Field(default=256, ge=8, le=131_072)  # agents truncate to it, workers refuse longer
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)  # held out locally, never trained on
    eval_examples: int = Field(default=32, ge=0, le=100_000)  # evaluated after each round (0: off)
    eval_max_new_tokens: int = Field(default=16, ge=1, le=4096)  # generation jobs' round evaluation
    labels: list[str] | None = Field(default=None, min_length=1, max_length=10_000)  # classification
    template: str = Field(default=DEFAULT_CLASSIFICATION_TEMPLATE, min_length=1, max_length=2000)
    # The workers' side (`flglm.step_protocol.WorkerJobSpec`).
    max_batch_size: int = Field(default=64, ge=1, le=65_536)  # rows per forward group
    checkpoint_every: int = Field(default=10, ge=1)  # server steps between checkpoints (+ one at round end)
    server_fedavg_every: int = Field(default=10, ge=1)  # server_hierarchical: steps between replica FedAvg
    batch_window_s: float = Field(default=2.0, ge=0, le=3600)  # batch modes: how long a batch waits
    exchange_timeout_s: float = Field(default=120.0, gt=0, le=86_400)  # peer replicas' exchange
    inflight_timeout_s: float = Field(default=600.0, gt=0, le=86_400)  # an unanswered graph is dropped
    max_pending: int = Field(default=256, ge=1, le=100_000)  # forwards queued behind the in-flight step
    blob_ttl_s: float = Field(default=6 * 3600.0, gt=0, le=90 * 86_400)

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        blank = [label for label in labels if not label.strip()]
        repeated = sorted(label for label, n in Counter(labels).items() if n > 1)
        if blank or repeated:
            raise ValueError(
                "labels must be distinct and not blank"
                + (f"; repeated: {repeated}" if repeated else "")
                + ("; a blank label" if blank else "")
            )
        return labels

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))

    def engine_settings(self) -> dict[str, Any]:
        """The fields `WorkerJobSpec` carries at its top level."""
        return self.model_dump(include=set(ENGINE_SETTINGS))


ENGINE_SETTINGS = (
    "seed",
    "max_batch_size",
    "max_seq_len",
    "checkpoint_every",
    "server_fedavg_every",
    "batch_window_s",
    "exchange_timeout_s",
    "inflight_timeout_s",
    "max_pending",
    "blob_ttl_s",
)
