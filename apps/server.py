"""The composition root of the control plane: `create_app` with the parts the backend may not import itself.

The backend imports neither the worker nor torch. The embedded mode (`FLGLM_EXECUTOR=inprocess`) runs the
worker's task functions in the backend's process, and the generate route runs the caller's half of a split
generation (front and back) there too: both are wired in here, and both import torch only when first used.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi import FastAPI

from backend.app import create_app
from backend.settings import Settings
from flglm.contracts.blob_store import BlobStore
from flglm.contracts.dispatch import TaskDispatcher
from flglm.generation_protocol import BodyTransport, SamplingConfig


def inprocess_executor(store: BlobStore, server_key: X25519PrivateKey, settings: Settings) -> TaskDispatcher:
    """The embedded mode's dispatcher: the worker's task functions in this process (loads torch)."""
    from worker.executor import InProcessExecutor

    return InProcessExecutor(store, server_key, settings.replica_idle_ttl_s)


def complete_prompts(
    bundle: bytes, prompts: list[str], sampling: SamplingConfig, body_transport: BodyTransport
) -> list[str]:
    """The generate route's caller half (front and back here, the body on a worker); loads torch."""
    from flglm.generation import complete_with_bundle

    return complete_with_bundle(bundle, prompts, sampling, body_transport)


def create_server_app(settings: Settings | None = None) -> FastAPI:
    """The control plane as `flglm serve` runs it, in either executor mode."""
    return create_app(settings, inprocess_dispatcher=inprocess_executor, complete_prompts=complete_prompts)
