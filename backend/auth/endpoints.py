"""`/auth/me` (who am I) and `/tokens` (operators' API tokens: list, create, revoke), rate-limited."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from backend.api.deps import AdminDep, CurrentPrincipal, RateLimitDep, SessionDep
from backend.api.pagination import Page, PageDep
from backend.api.responses import AUTHENTICATED, ROLE_GATED, errors
from backend.auth.repository import ApiTokenRepository
from backend.auth.schemas import ApiTokenCreate, ApiTokenCreated, ApiTokenView, PrincipalView, Role
from backend.auth.service import create_api_token, revoke_api_token
from backend.models import utc_now
from flglm.protocol import MAX_DB_INT

router = APIRouter(prefix="/auth", tags=["auth"], dependencies=[RateLimitDep], responses=AUTHENTICATED)
tokens_router = APIRouter(
    prefix="/tokens", tags=["tokens"], dependencies=[RateLimitDep], responses=ROLE_GATED
)

TokenId = Annotated[int, Path(ge=1, le=MAX_DB_INT)]


@router.get("/me", response_model=PrincipalView)
def who_am_i(principal: CurrentPrincipal) -> PrincipalView:
    return PrincipalView(kind=principal.kind, id=principal.id, name=principal.name, role=principal.role)


@tokens_router.get("", response_model=Page[ApiTokenView])
def list_tokens(session: SessionDep, _: AdminDep, page: PageDep) -> Page[ApiTokenView]:
    """Every API token, revoked ones included, oldest first; never a secret or its hash."""
    rows, total = ApiTokenRepository(session).page(limit=page.limit, offset=page.offset)
    items = [ApiTokenView.model_validate(row) for row in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@tokens_router.post("", response_model=ApiTokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: ApiTokenCreate, session: SessionDep, admin: AdminDep) -> ApiTokenCreated:
    """A named token with a role; its secret is in this answer only (the server keeps a hash)."""
    token, secret = create_api_token(session, admin.actor, body.name, Role(body.role))
    return ApiTokenCreated(**ApiTokenView.model_validate(token).model_dump(), token=secret)


@tokens_router.delete("/{token_id}", response_model=ApiTokenView, responses=errors(404, 409))
def revoke_token(token_id: TokenId, session: SessionDep, admin: AdminDep) -> ApiTokenView:
    """Revoke at once: every later request with it is a 401. 409 for the last active admin token."""
    return ApiTokenView.model_validate(revoke_api_token(session, admin.actor, token_id, utc_now()))
