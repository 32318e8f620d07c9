"""`GET /jobs/{id}/export`: the job's adapters as one safetensors bundle, for admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from backend.api.deps import AdminDep, SessionDep, SettingsDep
from backend.exports import service

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
