"""`Annotated` dependency aliases used by every endpoint: session, settings, principal and role gates."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from backend.auth.schemas import Principal, Role
from backend.auth.service import authenticate, hash_secret, note_api_token_use, require_role
from backend.authenticate_first import PRINCIPAL_STATE
from backend.errors import RateLimited
from backend.limits import TokenBucketLimiter, retry_after
from backend.models import utc_now
from backend.settings import Settings

bearer_scheme = HTTPBearer(auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: commit when the endpoint returned, roll back when it raised.

    Services never commit; this is the only place that does, before the response is sent (scope="function").
    """
    session: Session = request.app.state.session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


@contextmanager
def brief_session(request: Request) -> Iterator[Session]:
    """A transaction of its own, closed (its pooled connection returned) before the caller goes on: for the
    routes that wait (long-polls, uploads waiting for admission), which must never hold a connection while
    they wait, or a round's worth of waiting agents would take the whole pool."""
    session: Session = request.app.state.session_factory()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


def get_settings_from_app(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]


def authenticated_already(request: Request) -> Principal | None:
    """The principal `AuthenticateFirst` found for this request (requests with a body), if it ran."""
    principal: Principal | None = request.scope.get("state", {}).get(PRINCIPAL_STATE)
    return principal


def get_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """Checked on every request (a revoked token or client is refused at once); API tokens note their use."""
    principal = authenticated_already(request) or authenticate(
        session, credentials.credentials if credentials else None
    )
    if principal.kind == "token":
        note_api_token_use(session, request.app.state.session_factory, principal.id, utc_now())
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: CurrentPrincipal) -> Principal:
    return require_role(principal, Role.admin)


def require_operator(principal: CurrentPrincipal) -> Principal:
    """Admins and viewers: the read side of the operator API."""
    return require_role(principal, Role.admin, Role.viewer)


def require_client(principal: CurrentPrincipal) -> Principal:
    return require_role(principal, Role.client)


def require_client_briefly(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """`ClientDep` for the routes that wait: authenticated in a `brief_session`, released at once."""
    principal = authenticated_already(request)
    if principal is None:
        with brief_session(request) as session:
            principal = authenticate(session, credentials.credentials if credentials else None)
    return require_role(principal, Role.client)


AdminDep = Annotated[Principal, Depends(require_admin)]
OperatorDep = Annotated[Principal, Depends(require_operator)]
ClientDep = Annotated[Principal, Depends(require_client)]
WaitingClientDep = Annotated[Principal, Depends(require_client_briefly)]


def enforce_rate_limit(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """One bucket per client address and one per credential: both must have a token left.

    The address is the connection's peer; `X-Forwarded-For` counts only from the proxies listed in
    `FLGLM_TRUSTED_PROXIES` (`flglm serve` tells uvicorn so), so rotating that header buys nothing."""
    limiter: TokenBucketLimiter = request.app.state.rate_limiter
    keys = [f"ip:{request.client.host if request.client else 'unknown'}"]
    if credentials is not None and credentials.credentials:
        keys.append(f"credential:{hash_secret(credentials.credentials)[:32]}")
    wait_s = max(limiter.acquire(key) for key in keys)
    if wait_s > 0:
        raise RateLimited("too many requests; slow down", headers={"Retry-After": retry_after(wait_s)})


RateLimitDep = Depends(enforce_rate_limit)
