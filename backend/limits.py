"""Request limits: an ASGI body-size guard (413 without buffering) and a per-IP token bucket (429)."""

from __future__ import annotations

import json
import math
import threading
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodySizeLimit:
    """Rejects by Content-Length before reading anything, and counts streamed (chunked) bytes as they arrive.

    The counting receive raises `BodyTooLarge` (an HTTPException, so FastAPI's body parser re-raises
    it and the error handler answers 413) as soon as the limit is crossed; the rest of the body is never read.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(send)
            return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "code": "body_too_large",
                    "message": f"request body exceeds {self.max_body_bytes} bytes",
                }
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class TokenBucketLimiter:
    """In-process token bucket per key (client IP): `burst` requests at once, refilled at `per_minute`.

    A bucket that has refilled completely is the same as no bucket, so buckets idle that long are pruned
    (every `max_buckets // 2` new keys), and the dict never grows past `max_buckets`: at that size, keys
    that are not there yet are refused until pruning makes room (a flood of forged keys cannot grow it).
    """

    def __init__(self, per_minute: float, burst: int, max_buckets: int = 100_000) -> None:
        self.rate_per_s = per_minute / 60.0
        self.burst = float(burst)
        self.max_buckets = max_buckets
        self._buckets: dict[str, tuple[float, float]] = {}
        self._new_since_prune = 0
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        """Drop the buckets that have refilled to `burst` (indistinguishable from a fresh one)."""
        if self.rate_per_s <= 0:
            return
        full_after_s = self.burst / self.rate_per_s
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after_s}
        self._new_since_prune = 0

    def bucket_count(self) -> int:
        with self._lock:
            return len(self._buckets)

    def acquire(self, key: str, now: float | None = None) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if key not in self._buckets:
                self._new_since_prune += 1
                if self._new_since_prune >= self.max_buckets // 2 or len(self._buckets) >= self.max_buckets:
                    self._prune(now)
                if len(self._buckets) >= self.max_buckets:
                    return 1.0 / self.rate_per_s if self.rate_per_s > 0 else math.inf
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if self.rate_per_s <= 0:
                return math.inf
            return (1.0 - tokens) / self.rate_per_s


def retry_after(wait_s: float) -> str:
    """The `Retry-After` header of a refusal that must wait `wait_s` (an hour when it never refills)."""
    return "3600" if math.isinf(wait_s) else str(max(1, math.ceil(wait_s)))
