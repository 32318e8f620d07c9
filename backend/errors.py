"""Typed domain errors and the ONE place that maps them (and FastAPI/Starlette errors) to HTTP responses.

Every error body is `{"error": {"code": ..., "message": ...}}` (a 422 adds `fields`, one readable problem
each: field, message, allowed values, suggestion). Domain errors live next to their service and
subclass one of the kinds below; the kind alone decides the HTTP status.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from kombu.exceptions import OperationalError as BrokerUnavailable
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import OperationalError as DatabaseUnavailable
from starlette.exceptions import HTTPException as StarletteHTTPException

from flglm.contracts.refusals import StepRejected
from flglm.contracts.validation_errors import FieldProblem, describe_errors

log = logging.getLogger(__name__)


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class Unauthorized(DomainError):
    code = "unauthorized"


class Forbidden(DomainError):
    code = "forbidden"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class Gone(DomainError):
    """The object existed but is gone for good (a job's server key deleted after its retention)."""

    code = "gone"


class InvalidInput(DomainError):
    code = "invalid_input"


class RateLimited(DomainError):
    code = "rate_limited"


class BadRequest(DomainError):
    code = "bad_request"


class PayloadTooLarge(DomainError):
    code = "body_too_large"


class Unavailable(DomainError):
    code = "unavailable"


HTTP_STATUS_BY_KIND: dict[type[DomainError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Gone: 410,
    InvalidInput: 422,
    RateLimited: 429,
    BadRequest: 400,
    PayloadTooLarge: 413,
    Unavailable: 503,
}

CODE_BY_HTTP_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "body_too_large",
    422: "validation_error",
    429: "rate_limited",
}


def http_status_of(error: DomainError) -> int:
    for kind in type(error).__mro__:
        if kind in HTTP_STATUS_BY_KIND:
            return HTTP_STATUS_BY_KIND[kind]  # type: ignore[index]
    return 500


_KIND_BY_STATUS: dict[int, type[DomainError]] = {status: kind for kind, status in HTTP_STATUS_BY_KIND.items()}


def refusal(exc: StepRejected) -> DomainError:
    """The HTTP error of a step refusal (`flglm.contracts.refusals`): its status, its code, its message."""
    error = _KIND_BY_STATUS.get(exc.http_status, BadRequest)(str(exc))
    error.code = exc.code
    return error


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _body_model(request: Request | None) -> Any:
    """The annotation of the route's one (not embedded) body parameter, where its errors' paths start."""
    route = request.scope.get("route") if request is not None else None
    params = route.dependant.body_params if isinstance(route, APIRoute) else []
    if len(params) == 1 and not getattr(params[0].field_info, "embed", False):
        return params[0].field_info.annotation
    return None


def describe_validation_errors(
    exc: RequestValidationError, request: Request | None = None
) -> tuple[str, list[FieldProblem]]:
    """'body.rounds: Input should be a valid integer (got 'x'); body.model: unknown field; did you mean
    model_ref?' and the same problems one by one (`flglm.contracts.validation_errors`, as the CLI)."""
    problems = describe_errors(exc.errors(), _body_model(request), ("body",))
    return "; ".join(problem.line() for problem in problems) or "invalid request", problems


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return error_response(http_status_of(exc), exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = describe_validation_errors(exc, request)
        body = {"code": "validation_error", "message": message}
        fields = [problem.model_dump(exclude_none=True) for problem in problems]
        return JSONResponse({"error": {**body, "fields": fields}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = CODE_BY_HTTP_STATUS.get(exc.status_code, f"http_{exc.status_code}")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, exc: IntegrityError) -> JSONResponse:
        # A unique constraint lost a race that the service's own checks could not see (two concurrent
        # creates of the same name): the transaction was rolled back, so it is a plain conflict.
        log.info("integrity error mapped to 409: %s", exc.orig)
        return error_response(409, "conflict", "the request conflicts with a concurrent change; retry it")

    async def _store_down(_: Request, exc: Exception) -> JSONResponse:
        # Redis (blob store, broker) restarting, or unreachable: transient; agents retry 5xx with backoff.
        log.warning("blob store / broker unavailable: %s: %s", type(exc).__name__, exc)
        message = "the blob store or task broker is unavailable (restarting?); retry shortly"
        return error_response(503, "store_unavailable", message, {"Retry-After": "1"})

    for kind in (RedisConnectionError, RedisTimeout, BrokerUnavailable):
        app.add_exception_handler(kind, _store_down)

    @app.exception_handler(DatabaseUnavailable)
    async def _database_down(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        message = "the database is unavailable or busy; retry shortly"
        return error_response(503, "database_unavailable", message, {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
