"""Request and answer of `POST /jobs/{id}/generate`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from flglm.contracts.request_model import StrictModel
from flglm.generation_protocol import MAX_SESSION_BATCH


class GenerateRequest(StrictModel):
    # One batch of a generation session on the worker.
    prompts: list[Annotated[str, Field(max_length=20_000)]] = Field(
        min_length=1, max_length=MAX_SESSION_BATCH
    )
    max_new_tokens: int = Field(32, ge=1, le=256)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0, le=1_000_000)
    seed: int = Field(0, ge=0, le=2**63 - 1)


class GenerateView(BaseModel):
    completions: list[str]
    model_ref: str
    server_checkpoint: str
    client_adapters: str
