"""Generation-session protocol shared by the CLI, the backend and the worker: paths, limits, blob keys, views.

A generation session is one split generation whose body runs on a worker: the caller (the backend's
generate route, or `flglm generate`) keeps the front and back with their KV caches, the worker keeps the
server body's KV cache under (job id, session id). Per call the caller sends the new positions' hidden states
(batch, new, hidden) and the whole attention mask so far (batch, cached + new) as one safetensors dict
(`hidden_states`, `attention_mask`) and gets the body's output back as safetensors (`hidden_states`).
Torch-free (pydantic only), so the control plane can import it in the Celery mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, Field

# Operator paths (relative to flglm.protocol.API_PREFIX), admins only.
GENERATION_SESSIONS_PATH = "/jobs/{job_id}/generate/sessions"
GENERATION_SESSION_PATH = GENERATION_SESSIONS_PATH + "/{session_id}"
GENERATION_BODY_PATH = GENERATION_SESSION_PATH + "/body"
TENSORS_MEDIA_TYPE = "application/vnd.safetensors"

HIDDEN_STATES = "hidden_states"
ATTENTION_MASK = "attention_mask"

# What one session accepts: rows per call (the generate route's prompt cap) and tokens in its cache.
MAX_SESSION_BATCH = 8
MAX_SESSION_TOKENS = 4096
SESSION_ID_PATTERN = "^[0-9a-f]{32}$"
BLOB_TTL_S = 600.0  # a body call's input and output blobs: read within the call, deleted after it


def body_input_key(job_id: int, session_id: str, call_id: str) -> str:
    return f"gen:{job_id}:{session_id}:{call_id}:in"


def body_output_key(job_id: int, session_id: str, call_id: str) -> str:
    return f"gen:{job_id}:{session_id}:{call_id}:out"


class GenerationSessionView(BaseModel):
    """Answer of opening a session: its id and what the worker serves in it."""

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    job_id: int
    model_ref: str
    hidden_size: int
    server_checkpoint: str
    max_batch_size: int = MAX_SESSION_BATCH
    max_tokens: int = MAX_SESSION_TOKENS
    idle_ttl_s: float


BodyTransport = Callable[[bytes], bytes]  # encoded body input -> encoded body output


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
