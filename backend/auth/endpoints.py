"""`/auth`: who am I, and API tokens for operators (rate-limited)."""

from __future__ import annotations

from fastapi import APIRouter, status

from backend.api.deps import AdminDep, CurrentPrincipal, RateLimitDep, SessionDep
from backend.auth.schemas import ApiTokenCreate, ApiTokenCreated, PrincipalView, Role
from backend.auth.service import create_api_token

router = APIRouter(prefix="/auth", tags=["auth"], dependencies=[RateLimitDep])


@router.get("/me", response_model=PrincipalView)
def who_am_i(principal: CurrentPrincipal) -> PrincipalView:
    return PrincipalView(kind=principal.kind, id=principal.id, name=principal.name, role=principal.role)


@router.post("/tokens", response_model=ApiTokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: ApiTokenCreate, session: SessionDep, admin: AdminDep) -> ApiTokenCreated:
    token, secret = create_api_token(session, admin.actor, body.name, Role(body.role))
    return ApiTokenCreated(
        id=token.id,
        name=token.name,
        role=token.role,
        created_at=token.created_at,
        revoked_at=None,
        token=secret,
    )
