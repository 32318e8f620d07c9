"""`GET /jobs/{id}/export` (the adapters as one safetensors bundle, admins) and `POST /jobs/{id}/generate`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from backend.api.deps import AdminDep, OperatorDep, SessionDep, SettingsDep
from backend.exports import service
from backend.exports.schemas import GenerateRequest, GenerateView

router = APIRouter(prefix="/jobs", tags=["jobs"])

EXPORT_MEDIA_TYPE = "application/vnd.safetensors"


@router.get(
    "/{job_id}/export",
    response_class=Response,
    responses={200: {"content": {EXPORT_MEDIA_TYPE: {}}, "description": "safetensors bundle"}},
)
def export_job(
    job_id: Annotated[int, Path(ge=1)], session: SessionDep, settings: SettingsDep, admin: AdminDep
) -> Response:
    bundle = service.export_bundle(session, settings, admin.actor, job_id)
    return Response(
        bundle,
        media_type=EXPORT_MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}-adapters.safetensors"'},
    )


@router.post("/{job_id}/generate", response_model=GenerateView)
def generate(
    job_id: Annotated[int, Path(ge=1)],
    request: GenerateRequest,
    session: SessionDep,
    settings: SettingsDep,
    operator: OperatorDep,
) -> GenerateView:
    """Complete prompts with the job's trained model, through the split (all parts in the backend)."""
    return service.generate_completions(session, settings, operator.actor, job_id, request)
