"""Authenticate a request that carries a body before anything reads it: an anonymous body costs nothing."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.auth.schemas import Principal
from backend.auth.service import authenticate
from backend.errors import DomainError, RateLimited, error_response, http_status_of
from backend.limits import TokenBucketLimiter, retry_after
from flglm.protocol import API_PREFIX, ENROLL_PATH

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The one route that takes a body without a bearer credential: enrollment (its one-time token is inside).
ANONYMOUS_BODY_PATHS = frozenset({API_PREFIX + ENROLL_PATH})
_AUTHORIZATION = b"authorization"
PRINCIPAL_STATE = "principal"  # the request state key the principal found here is kept under


class AuthenticateFirst:
    """FastAPI reads and parses a JSON body before it runs the route's dependencies, so an anonymous client
    could make the server hold and parse megabytes (16 MB × 12 requests: +490 MB) only to be refused. This
    checks the bearer credential first (a brief session of its own) and answers 401 without reading the
    body; the principal it found is handed to the route's dependencies (`PRINCIPAL_STATE`), which then do
    not look the credential up a second time."""

    def __init__(
        self, app: ASGIApp, session_factory: sessionmaker[Session], limiter: TokenBucketLimiter
    ) -> None:
        self.app = app
        self.session_factory = session_factory
        self.limiter = limiter  # refused attempts spend the address's bucket: guessing stays rate limited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in BODY_METHODS
            and scope["path"].startswith(API_PREFIX + "/")
            and scope["path"] not in ANONYMOUS_BODY_PATHS
        ):
            outcome = await run_in_threadpool(
                self._authenticate, dict(scope.get("headers", [])).get(_AUTHORIZATION)
            )
            if isinstance(outcome, Principal):
                scope.setdefault("state", {})[PRINCIPAL_STATE] = outcome  # the route's dependencies take it
            else:
                error = outcome
                client = scope.get("client")
                wait_s = self.limiter.acquire(f"ip:{client[0] if client else 'unknown'}")
                if wait_s > 0:
                    error = RateLimited(
                        "too many requests; slow down", headers={"Retry-After": retry_after(wait_s)}
                    )
                response = error_response(http_status_of(error), error.code, error.message, error.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authenticate(self, header: bytes | None) -> Principal | DomainError:
        scheme, _, secret = (header or b"").decode("latin-1").partition(" ")
        try:
            with self.session_factory() as session:
                return authenticate(session, secret.strip() if scheme.lower() == "bearer" else None)
        except DomainError as error:
            return error
