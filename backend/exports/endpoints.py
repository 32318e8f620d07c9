"""`GET /jobs/{id}/export` (the adapters as one safetensors bundle, admins), `POST /jobs/{id}/generate`, and
the generation-session routes through which `flglm generate` runs the body on a worker.

Generation always splits the model: front and back at the caller (this backend for `/generate`, the CLI
for the session routes), the body with its KV cache on a worker (`worker.generation`). The session routes
are for admins only, who already hold the client adapters through the export; what crosses them (hidden
states after the front, the body's output) is protected by TLS like every other route, not by the per-client
AES keys of training, because the operator is not a data owner.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status
from starlette.concurrency import run_in_threadpool

from backend.api.deps import AdminDep, SessionDep, SettingsDep
from backend.api.responses import ROLE_GATED, errors, raw_body
from backend.exports import service, sessions
from backend.exports.schemas import GenerateRequest, GenerateView
from backend.jobs.service import get_job
from backend.steps.endpoints import RelayDep, in_wait_pool, read_typed_body
from flglm.generation_protocol import (
    GENERATION_BODY_PATH,
    GENERATION_SESSION_PATH,
    GENERATION_SESSIONS_PATH,
    SESSION_ID_PATTERN,
    TENSORS_MEDIA_TYPE,
    GenerationSessionView,
)
from flglm.protocol import MAX_DB_INT

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=ROLE_GATED)
generation_router = APIRouter(
    tags=["generation"], responses=ROLE_GATED
)  # session paths are full paths (flglm.generation_protocol)

EXPORT_MEDIA_TYPE = TENSORS_MEDIA_TYPE
JobId = Annotated[int, Path(ge=1, le=MAX_DB_INT)]
SessionId = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="from opening the session")]
BODY_MEDIA_TYPES = (TENSORS_MEDIA_TYPE, "application/octet-stream")


@router.get(
    "/{job_id}/export",
    response_class=Response,
    responses={
        200: {"content": {EXPORT_MEDIA_TYPE: {}}, "description": "safetensors bundle"},
        **errors(404, 409),
    },
)
def export_job(job_id: JobId, session: SessionDep, settings: SettingsDep, admin: AdminDep) -> Response:
    bundle = service.export_bundle(session, settings, admin.actor, job_id)
    return Response(
        bundle,
        media_type=EXPORT_MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}-adapters.safetensors"'},
    )


@router.post("/{job_id}/generate", response_model=GenerateView, responses=errors(404, 409, 503))
def generate(
    job_id: JobId,
    request: GenerateRequest,
    session: SessionDep,
    settings: SettingsDep,
    relay: RelayDep,
    admin: AdminDep,
    http: Request,
) -> GenerateView:
    """Complete prompts with the job's trained model: front and back here, the body on a worker."""
    complete = http.app.state.complete_prompts
    return sessions.generate_completions(session, settings, relay, complete, admin.actor, job_id, request)


@generation_router.post(
    GENERATION_SESSIONS_PATH,
    response_model=GenerationSessionView,
    status_code=status.HTTP_201_CREATED,
    responses=errors(404, 409, 503),
)
def open_generation_session(
    job_id: JobId, session: SessionDep, settings: SettingsDep, relay: RelayDep, admin: AdminDep
) -> GenerationSessionView:
    """Open a session on a worker holding the job's body (newest server adapters) and a fresh KV cache.

    The caller runs the front and back from the export bundle. Idle sessions close after `idle_ttl_s`.
    """
    return sessions.open_generation_session(session, settings, relay, admin.actor, job_id)


@generation_router.post(
    GENERATION_BODY_PATH,
    response_class=Response,
    responses={
        200: {"content": {TENSORS_MEDIA_TYPE: {}}, "description": "safetensors {hidden_states}"},
        **errors(404, 409, 415, 503),
    },
    openapi_extra=raw_body(
        *BODY_MEDIA_TYPES, description="safetensors {hidden_states, attention_mask} (see the summary)"
    ),
)
async def run_generation_body(
    request: Request,
    job_id: JobId,
    session_id: SessionId,
    session: SessionDep,
    settings: SettingsDep,
    relay: RelayDep,
    admin: AdminDep,
) -> Response:
    """Run the body on the new positions: the request is safetensors {hidden_states (batch, new, hidden) in
    float32/float16/bfloat16, attention_mask (batch, cached + new) int64}; the answer is safetensors
    {hidden_states} of the same shape and dtype. 422 for wrong names, dtypes, hidden size or limits, 409 for
    a mask that does not continue the session's cache, 404 for a session the worker does not hold."""
    data = await read_typed_body(request, BODY_MEDIA_TYPES, "the tensors")
    await run_in_threadpool(get_job, session, job_id)
    timeout_s = settings.generation_task_timeout_s
    # Waits for a worker task (up to timeout_s, once per token): the step pool, not the request threadpool.
    output = await in_wait_pool(relay, sessions.run_body, relay, timeout_s, job_id, session_id, data)
    return Response(content=output, media_type=TENSORS_MEDIA_TYPE)


@generation_router.delete(
    GENERATION_SESSION_PATH, status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 503)
)
def close_generation_session(
    job_id: JobId,
    session_id: SessionId,
    session: SessionDep,
    settings: SettingsDep,
    relay: RelayDep,
    admin: AdminDep,
) -> Response:
    """Close a session (its KV cache is dropped); 404 when the worker no longer holds it."""
    get_job(session, job_id)
    if not sessions.close_session(relay, settings.generation_task_timeout_s, job_id, session_id):
        raise sessions.GenerationSessionNotFound(
            f"generation session {session_id} of job {job_id} is not open"
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
