"""Generation sessions from the caller's side: open, body call and close through the executor (torch-free).

The body of a split generation runs on a worker (`worker.generation`), the front and back at the caller: the
backend's generate route, or `flglm generate` through the session routes. Every call is a task on
`replica_queue(0)` (one process holds the sessions' KV caches); tensors travel through the blob store under
one-off keys, the task carries only the keys. Nothing here imports torch: the worker decodes and checks the
tensors (names, dtypes, hidden size, batch and token limits) and refuses bad ones with a typed error that
becomes a 4xx here (`backend.errors.refusal`). The front and back of the generate route run in the callable
the app layer hands to `create_app` (`flglm.generation.complete_with_bundle`: it loads torch, on that route
only); a backend built without one answers that route with a 503.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from backend.audit.service import record
from backend.errors import BadRequest, DomainError, NotFound, Unavailable, refusal
from backend.exports.schemas import GenerateRequest, GenerateView
from backend.exports.service import NothingToExport, build_bundle, job_checkpoint_dir
from backend.jobs.service import get_job
from backend.settings import Settings
from backend.steps.relay import StepRelay
from flglm.contracts.artifacts import latest_server_checkpoint
from flglm.contracts.refusals import StepRejected
from flglm.contracts.tasks import BODY_GENERATE, BODY_GENERATE_CLOSE, BODY_GENERATE_OPEN
from flglm.generation_protocol import (
    BLOB_TTL_S,
    BodyTransport,
    GenerationSessionView,
    SamplingConfig,
    body_input_key,
    body_output_key,
)
from flglm.step_protocol import replica_queue

GENERATION_QUEUE = replica_queue(0)  # served by exactly one process: where the sessions' caches live


class WorkerTimeout(Unavailable):
    code = "worker_timeout"


class GenerationSessionNotFound(NotFound):
    code = "unknown_generation_session"


def _run_task(relay: StepRelay, name: str, kwargs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    handle = relay.dispatcher.submit(name, kwargs, GENERATION_QUEUE)
    try:
        return handle.get(timeout_s)
    except StepRejected as exc:
        raise refusal(exc) from None
    except TimeoutError:
        raise WorkerTimeout(
            f"no worker answered {name} within {timeout_s:g} s (is a worker serving {GENERATION_QUEUE}?)"
        ) from None


def open_session(
    session: Session, settings: Settings, relay: StepRelay, job_id: int
) -> GenerationSessionView:
    """A new session on a worker, holding the job's body with its newest server adapters."""
    job = get_job(session, job_id)
    directory = job_checkpoint_dir(settings, job.id)
    if latest_server_checkpoint(directory, replica=0) is None:
        raise NothingToExport(
            f"job {job.id} has no server adapter checkpoint yet: generate after its first round"
        )
    session_id = uuid.uuid4().hex
    kwargs = {
        "job_id": job.id,
        "session_id": session_id,
        "model_ref": job.model_ref,
        "split_plan": dict(job.split_plan),
        "adapter": dict(job.adapter),
        "checkpoint_dir": directory,
    }
    opened = _run_task(relay, BODY_GENERATE_OPEN, kwargs, settings.generation_task_timeout_s)
    return GenerationSessionView(
        session_id=session_id,
        job_id=job.id,
        model_ref=job.model_ref,
        hidden_size=int(opened["hidden_size"]),
        server_checkpoint=str(opened["server_checkpoint"]),
        idle_ttl_s=float(opened["idle_ttl_s"]),
    )


def open_generation_session(
    session: Session, settings: Settings, relay: StepRelay, actor: str, job_id: int
) -> GenerationSessionView:
    """`open_session` for an operator who runs the front and back (`flglm generate`); audited."""
    view = open_session(session, settings, relay, job_id)
    detail = {"session": view.session_id, "server": view.server_checkpoint}
    record(session, actor, "job.generate_session", "job", job_id, detail)
    return view


def run_body(relay: StepRelay, timeout_s: float, job_id: int, session_id: str, data: bytes) -> bytes:
    """One body call: encoded input (`flglm.generation.encode_body_input`) in, encoded output out."""
    if not data:
        raise BadRequest(
            "the request body is empty; send the hidden states and attention mask as safetensors"
        )
    call_id = uuid.uuid4().hex
    input_key, output_key = (
        body_input_key(job_id, session_id, call_id),
        body_output_key(job_id, session_id, call_id),
    )
    relay.store.put_if_absent(input_key, data, BLOB_TTL_S)
    try:
        kwargs = {
            "job_id": job_id,
            "session_id": session_id,
            "input_key": input_key,
            "output_key": output_key,
        }
        _run_task(relay, BODY_GENERATE, kwargs, timeout_s)
        output = relay.store.get(output_key)
        if output is None:
            raise WorkerTimeout(f"the worker's output {output_key} expired before it was read")
        return output
    finally:
        relay.store.delete(input_key)
        relay.store.delete(output_key)


def close_session(relay: StepRelay, timeout_s: float, job_id: int, session_id: str) -> bool:
    """Drop the session's cache on the worker; False when the worker no longer held it."""
    result = _run_task(relay, BODY_GENERATE_CLOSE, {"job_id": job_id, "session_id": session_id}, timeout_s)
    return bool(result["closed"])


CompletePrompts = Callable[[bytes, list[str], SamplingConfig, BodyTransport], list[str]]


class NoCallerGeneration(Unavailable):
    code = "generation_unavailable"


def generate_completions(
    session: Session,
    settings: Settings,
    relay: StepRelay,
    complete_prompts: CompletePrompts | None,
    actor: str,
    job_id: int,
    request: GenerateRequest,
) -> GenerateView:
    """Complete prompts through the job's split model: front and back (with their KV caches) in this process,
    the body (with its KV cache) on a worker in a generation session, closed at the end."""
    if complete_prompts is None:
        raise NoCallerGeneration(
            "this control plane was built without the caller's half of generation; run it with `flglm serve` "
            "(or build it with `apps.server.create_server_app`), or generate with `flglm generate`"
        )
    sampling = SamplingConfig(
        request.max_new_tokens, request.do_sample, request.temperature, request.top_k, request.seed
    )
    bundle, metadata = build_bundle(session, settings, job_id)
    opened = open_session(session, settings, relay, job_id)
    timeout_s = settings.generation_task_timeout_s
    try:
        body = functools.partial(run_body, relay, timeout_s, job_id, opened.session_id)
        completions = complete_prompts(bundle, request.prompts, sampling, body)
    finally:
        with contextlib.suppress(DomainError):  # an unreachable worker drops the session by its idle TTL
            close_session(relay, timeout_s, job_id, opened.session_id)
    detail = {"prompts": len(request.prompts), "server": opened.server_checkpoint}
    record(session, actor, "job.generate", "job", job_id, detail)
    return GenerateView(
        completions=completions,
        model_ref=metadata["model_ref"],
        server_checkpoint=opened.server_checkpoint,
        client_adapters=metadata["client_adapters"],
    )
