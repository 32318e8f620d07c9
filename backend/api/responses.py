"""The error statuses each route documents in OpenAPI, each with the one error body (`protocol.ErrorBody`).

`ANY_ROUTE` is what the middlewares and request validation can answer anywhere (set on `api_router`);
`AUTHENTICATED` and `OPERATOR`/`AGENT` what a credential check and a role gate add (set on each domain
router); `errors(...)` is a route's own extras. `raw_body(...)` documents a body the route reads itself.
"""

from __future__ import annotations

from typing import Any

from flglm.protocol import ErrorBody

DESCRIPTIONS = {
    400: "the body is not what its content type says (undecodable JSON)",
    401: "no credential, or an unknown, expired or revoked one",
    403: "the credential's role may not use this route",
    404: "no such object (or not one this caller may see)",
    409: "the object's state forbids it now",
    410: "the object is gone for good",
    413: "the body exceeds the server's limit (max_body_bytes)",
    415: "the body's content type is not the one this route reads",
    422: "a parameter or the body is invalid (names which)",
    426: "the agent speaks another protocol version (X-FLGLM-Protocol)",
    429: "too many requests; slow down (Retry-After)",
    503: "the service this needs is unavailable now; retry later",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, each with `ErrorBody` and its usual description."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses}


# The middlewares (BodySizeLimit 413, ProtocolVersionCheck 426) and request validation (422), on any route.
ANY_ROUTE = errors(413, 422, 426)
# A route that needs a credential: AuthenticateFirst and the route's own check (401), the rate limits (429,
# also spent by refused credentials), and a body that does not decode (400).
AUTHENTICATED = errors(400, 401, 429)
# ... behind a role gate (admins/viewers for operator routes, enrolled clients for agent routes).
ROLE_GATED = {**AUTHENTICATED, **errors(403)}


def raw_body(*media_types: str, description: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself (`request.body()`): a required binary body."""
    schema = {"type": "string", "format": "binary"}
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {media_type: {"schema": schema} for media_type in media_types},
        }
    }
