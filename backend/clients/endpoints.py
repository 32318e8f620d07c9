"""Client routes: enrollment tokens, listing and revocation for operators; enroll and heartbeat for agents."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, status

from backend.api.deps import AdminDep, ClientDep, OperatorDep, RateLimitDep, SessionDep, SettingsDep
from backend.api.pagination import Page, PageDep
from backend.api.responses import ROLE_GATED, errors
from backend.clients import service
from backend.clients.repository import ClientRepository
from backend.clients.schemas import ClientView, EnrollmentTokenCreate, EnrollmentTokenCreated
from backend.models import Client, utc_now
from backend.settings import Settings
from flglm import protocol
from flglm.protocol import MAX_DB_INT, ClientStatus

router = APIRouter(prefix="/clients", tags=["clients"], responses=ROLE_GATED)
agent_router = APIRouter(tags=["agent"])

ClientId = Annotated[int, Path(ge=1, le=MAX_DB_INT)]


@router.post(
    "/enrollment-tokens",
    response_model=EnrollmentTokenCreated,
    status_code=status.HTTP_201_CREATED,
    dependencies=[RateLimitDep],
    responses=errors(409),
)
def create_enrollment_token(
    body: EnrollmentTokenCreate, session: SessionDep, admin: AdminDep, settings: SettingsDep
) -> EnrollmentTokenCreated:
    ttl_s = body.expires_in_s or settings.enrollment_token_ttl_s
    client, token, expires_at = service.create_enrollment_token(
        session, admin.actor, body.name, ttl_s, utc_now()
    )
    return EnrollmentTokenCreated(client_id=client.id, name=client.name, token=token, expires_at=expires_at)


def _view(client: Client, settings: Settings) -> ClientView:
    view = ClientView.model_validate(client)
    view.online = service.is_online(client, utc_now(), settings.heartbeat_lease_s)
    return view


@router.get("", response_model=Page[ClientView])
def list_clients(
    session: SessionDep,
    _: OperatorDep,
    page: PageDep,
    settings: SettingsDep,
    status: ClientStatus | None = None,
) -> Page[ClientView]:
    rows, total = ClientRepository(session).page(limit=page.limit, offset=page.offset, status=status)
    return Page(items=[_view(r, settings) for r in rows], total=total, limit=page.limit, offset=page.offset)


@router.get("/{client_id}", response_model=ClientView, responses=errors(404))
def show_client(
    client_id: ClientId, session: SessionDep, _: OperatorDep, settings: SettingsDep
) -> ClientView:
    return _view(service.get_client(session, client_id), settings)


@router.post("/{client_id}/revoke", response_model=ClientView, responses=errors(404, 409))
def revoke_client(
    client_id: ClientId, session: SessionDep, admin: AdminDep, settings: SettingsDep
) -> ClientView:
    return _view(service.revoke(session, admin.actor, client_id, utc_now()), settings)


@agent_router.post(
    protocol.ENROLL_PATH,
    response_model=protocol.EnrollResponse,
    status_code=status.HTTP_201_CREATED,
    dependencies=[RateLimitDep],
    responses=errors(400, 401, 409, 429),  # anonymous: the one-time enrollment token is in the body
)
def enroll(body: protocol.EnrollRequest, request: Request, session: SessionDep) -> protocol.EnrollResponse:
    return service.enroll(session, body, request.app.state.server_public_key_b64, utc_now())


@agent_router.post(protocol.HEARTBEAT_PATH, response_model=protocol.HeartbeatResponse, responses=ROLE_GATED)
def heartbeat(
    body: protocol.HeartbeatRequest, session: SessionDep, client: ClientDep, settings: SettingsDep
) -> protocol.HeartbeatResponse:
    now = utc_now()
    updated = service.heartbeat(session, client.id, body.example_count, now)
    return protocol.HeartbeatResponse(
        client_id=updated.id,
        status=ClientStatus(updated.status),
        lease_s=settings.heartbeat_lease_s,
        server_time=now,
    )
