"""Refuse an agent that speaks another protocol version with a clear 426 before any route runs."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from backend.errors import error_response
from flglm.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION

SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
_HEADER = PROTOCOL_HEADER.lower().encode("latin-1")


class ProtocolVersionCheck:
    """Requests without the header (browsers, operator CLI) pass; an unsupported version gets 426."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            sent = dict(scope.get("headers", [])).get(_HEADER)
            if sent is not None and sent.decode("latin-1").strip() not in SUPPORTED_VERSIONS:
                response = error_response(
                    426,
                    "protocol_mismatch",
                    f"this server speaks agent protocol {', '.join(sorted(SUPPORTED_VERSIONS))}; "
                    f"the agent sent {sent.decode('latin-1')!r}",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
