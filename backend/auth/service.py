"""Authentication (bearer secret → principal), role checks, API tokens and the bootstrap admin token."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from backend.audit.service import record
from backend.auth.repository import ApiTokenRepository
from backend.auth.schemas import Principal, Role
from backend.clients.repository import ClientRepository
from backend.errors import Conflict, Forbidden, NotFound, Unauthorized
from backend.models import ApiToken, utc_now
from flglm.protocol import ClientStatus

API_TOKEN_PREFIX = "flglm_at_"
CLIENT_CREDENTIAL_PREFIX = "flglm_cc_"
ENROLLMENT_TOKEN_PREFIX = "flglm_et_"
# `last_used_at` is kept to this resolution, so an operator's requests write it at most once a minute.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class MissingCredential(Unauthorized):
    code = "missing_credential"


class InvalidCredential(Unauthorized):
    code = "invalid_credential"


class InsufficientRole(Forbidden):
    code = "insufficient_role"


class ApiTokenNotFound(NotFound):
    code = "api_token_not_found"


class LastAdminToken(Conflict):
    code = "last_admin_token"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Secrets are high-entropy random strings, so a plain SHA-256 is the right (fast, unsalted) hash."""
    return hashlib.sha256(secret.encode()).hexdigest()


def authenticate(session: Session, secret: str | None) -> Principal:
    if not secret:
        raise MissingCredential("no bearer credential given (Authorization: Bearer ...)")
    digest = hash_secret(secret)
    if secret.startswith(CLIENT_CREDENTIAL_PREFIX):
        client = ClientRepository(session).get_by_credential_hash(digest)
        if client is None:
            raise InvalidCredential("unknown client credential")
        if client.status == ClientStatus.revoked:
            raise InvalidCredential("this client has been revoked")
        return Principal(kind="client", id=client.id, name=client.name, role=Role.client)
    token = ApiTokenRepository(session).get_by_hash(digest)
    if token is None or token.revoked_at is not None:
        raise InvalidCredential("unknown or revoked API token")
    return Principal(kind="token", id=token.id, name=token.name, role=Role(token.role))


def require_role(principal: Principal, *allowed: Role) -> Principal:
    if principal.role not in allowed:
        wanted = " or ".join(role.value for role in allowed)
        raise InsufficientRole(f"this endpoint needs role {wanted}; you are {principal.role.value}")
    return principal


def create_api_token(session: Session, actor: str, name: str, role: Role) -> tuple[ApiToken, str]:
    secret = new_secret(API_TOKEN_PREFIX)
    token = ApiTokenRepository(session).add(
        ApiToken(name=name, role=role.value, token_hash=hash_secret(secret), created_at=utc_now())
    )
    record(session, actor, "api_token.create", "api_token", token.id, {"name": name, "role": role.value})
    return token, secret


def revoke_api_token(session: Session, actor: str, token_id: int, now: datetime) -> ApiToken:
    """Revoke at once (every later request with it is a 401); never the last active admin token."""
    tokens = ApiTokenRepository(session)
    token = tokens.get(token_id)
    if token is None:
        raise ApiTokenNotFound(f"no API token with id {token_id}")
    is_admin = token.role == Role.admin.value
    if is_admin:
        tokens.lock_active_admin_ids()  # PostgreSQL: concurrent revokes of admin tokens queue here
    if not tokens.mark_revoked(token_id, now):
        session.refresh(token)
        return token  # already revoked: revoking again changes nothing
    # Counted after the write, so two concurrent revokes cannot both see "one admin left" (PostgreSQL: the
    # row locks above; SQLite: the write lock that the UPDATE took).
    if is_admin and tokens.count_active_admins() == 0:
        raise LastAdminToken(
            f"API token {token_id} ({token.name}) is the last active admin token; create another admin "
            "token (POST /api/v1/tokens) before revoking it"
        )
    record(
        session, actor, "api_token.revoke", "api_token", token.id, {"name": token.name, "role": token.role}
    )
    return token


def note_api_token_use(
    session: Session, session_factory: sessionmaker[Session], token_id: int, now: datetime
) -> None:
    """Record the token's use (to `LAST_USED_RESOLUTION`) in its own short transaction.

    Not in the request's transaction: that one may stay open through a long-poll or a generation call, and
    must not hold the SQLite write lock (or the token's row lock) all that time.
    """
    token = ApiTokenRepository(session).get(token_id)  # already loaded by `authenticate`
    if token is None or (token.last_used_at is not None and now - token.last_used_at < LAST_USED_RESOLUTION):
        return
    with session_factory.begin() as writer:
        ApiTokenRepository(writer).mark_used(token_id, now, stale_before=now - LAST_USED_RESOLUTION)
    set_committed_value(token, "last_used_at", now)  # what this request shows, without writing it again


def ensure_bootstrap_admin(session: Session, configured_token: str) -> str | None:
    """Make sure an admin can log in: store the configured token, or create one when no admin exists.

    Returns a newly created secret (to show once), or None when nothing new was created.
    """
    tokens = ApiTokenRepository(session)
    if configured_token:
        if tokens.get_by_hash(hash_secret(configured_token)) is None:
            tokens.add(
                ApiToken(name="bootstrap-admin", role="admin", token_hash=hash_secret(configured_token))
            )
            record(session, "system", "api_token.bootstrap", "api_token", None, {"source": "settings"})
        return None
    if tokens.count_active_admins() > 0:
        return None
    secret = new_secret(API_TOKEN_PREFIX)
    token = tokens.add(ApiToken(name="bootstrap-admin", role="admin", token_hash=hash_secret(secret)))
    record(session, "system", "api_token.bootstrap", "api_token", token.id, {"source": "generated"})
    return secret
