"""Request and answer of `POST /jobs/{id}/generate`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flglm.generation_protocol import MAX_SESSION_BATCH


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # One batch of a generation session on the worker.
    prompts: list[str] = Field(min_length=1, max_length=MAX_SESSION_BATCH)
    max_new_tokens: int = Field(32, ge=1, le=256)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    seed: int = 0


class GenerateView(BaseModel):
    completions: list[str]
    model_ref: str
    server_checkpoint: str
    client_adapters: str
