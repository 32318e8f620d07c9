"""Enrollment, heartbeats, leases and revocation of client agents."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from backend.audit.service import record
from backend.auth.service import CLIENT_CREDENTIAL_PREFIX, ENROLLMENT_TOKEN_PREFIX, hash_secret, new_secret
from backend.clients.repository import ClientRepository, EnrollmentTokenRepository
from backend.errors import Conflict, NotFound, Unauthorized
from backend.jobs.service import drop_client_from_open_rounds
from backend.models import Client, EnrollmentToken
from flglm.protocol import ClientStatus, EnrollRequest, EnrollResponse


class ClientNotFound(NotFound):
    code = "client_not_found"


class ClientNameTaken(Conflict):
    code = "client_name_taken"


class EnrollmentTokenInvalid(Unauthorized):
    code = "enrollment_token_invalid"


def is_online(client: Client, now: datetime, lease_s: float) -> bool:
    """Online: active, and its agent heartbeat within the lease. Enrolling is no heartbeat, so a client whose
    agent never ran is not online."""
    heartbeat = client.last_heartbeat_at
    return (
        client.status == ClientStatus.active
        and heartbeat is not None
        and (now - heartbeat).total_seconds() <= lease_s
    )


def get_client(session: Session, client_id: int) -> Client:
    client = ClientRepository(session).get(client_id)
    if client is None:
        raise ClientNotFound(f"client {client_id} not found")
    return client


def create_enrollment_token(
    session: Session, actor: str, name: str, ttl_s: float, now: datetime
) -> tuple[Client, str, datetime]:
    """Reserve `name` (a pending client the operator can already invite) and issue a one-time token."""
    clients = ClientRepository(session)
    client = clients.get_by_name(name)
    if client is None:
        client = clients.add(Client(name=name, status=ClientStatus.pending, created_at=now))
    elif client.status != ClientStatus.pending:
        raise ClientNameTaken(f"client name {name!r} is already {client.status}")
    secret = new_secret(ENROLLMENT_TOKEN_PREFIX)
    expires_at = now + timedelta(seconds=ttl_s)
    EnrollmentTokenRepository(session).add(
        EnrollmentToken(
            token_hash=hash_secret(secret),
            client_id=client.id,
            created_by=actor,
            created_at=now,
            expires_at=expires_at,
        )
    )
    record(
        session, actor, "client.enrollment_token", "client", client.id, {"expires_at": expires_at.isoformat()}
    )
    return client, secret, expires_at


def enroll(session: Session, request: EnrollRequest, server_public_key: str, now: datetime) -> EnrollResponse:
    client_id = EnrollmentTokenRepository(session).claim(hash_secret(request.token), now)
    if client_id is None:
        raise EnrollmentTokenInvalid("enrollment token is unknown, expired or already used")
    client = get_client(session, client_id)
    if client.status != ClientStatus.pending:
        raise EnrollmentTokenInvalid(f"client {client.name!r} is {client.status}; ask for a new token")
    credential = new_secret(CLIENT_CREDENTIAL_PREFIX)
    client.public_key = request.public_key
    client.credential_hash = hash_secret(credential)
    client.status = ClientStatus.active
    client.example_count = request.example_count
    client.enrolled_at = now
    # No heartbeat yet: enrolling is not an agent running. The client reads online only once its agent
    # heartbeats (within the lease); a silent one still goes offline a lease after enrolling.
    client.last_heartbeat_at = None
    record(session, f"client:{client.id}:{client.name}", "client.enroll", "client", client.id, {})
    return EnrollResponse(
        client_id=client.id, name=client.name, credential=credential, server_public_key=server_public_key
    )


def heartbeat(session: Session, client_id: int, example_count: int | None, now: datetime) -> Client:
    client = get_client(session, client_id)
    if client.status == ClientStatus.offline:
        record(session, f"client:{client.id}:{client.name}", "client.online", "client", client.id, {})
    client.status = ClientStatus.active
    client.last_heartbeat_at = now
    if example_count is not None:
        client.example_count = example_count
    return client


def revoke(session: Session, actor: str, client_id: int, now: datetime) -> Client:
    client = get_client(session, client_id)
    if client.status == ClientStatus.revoked:
        return client
    client.status = ClientStatus.revoked
    client.revoked_at = now
    session.flush()
    record(session, actor, "client.revoke", "client", client.id, {})
    drop_client_from_open_rounds(session, client.id, "revoked", now)
    return client


def mark_silent_clients_offline(session: Session, now: datetime, lease_s: float) -> list[int]:
    """Clients silent for longer than the lease go offline and leave their open rounds (round policy)."""
    silent = ClientRepository(session).mark_silent_offline(now - timedelta(seconds=lease_s))
    for client_id in silent:
        record(session, "system", "client.offline", "client", client_id, {"lease_s": lease_s})
        drop_client_from_open_rounds(session, client_id, "offline", now)
    return silent
