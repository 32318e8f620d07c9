"""Tensor-blob storage with TTLs: one `BlobStore` interface, a Redis store and an in-process store."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol, runtime_checkable

import redis

BLPOP_SLICE_S = 2.0
# How long a caller waits for a free pooled connection before `redis.ConnectionError` (a 503 upstream).
POOL_WAIT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 128


def pooled_redis(url: str, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> redis.Redis:
    """A client on a bounded pool that makes a caller wait for a free connection instead of failing.

    redis-py's default pool raises `MaxConnectionsError` past 100 connections: with one connection per
    blocked BLPOP, 200 waiting long-polls turned into 503s. Size the pool to the threads that may block on
    it; a caller beyond that waits up to `POOL_WAIT_S`.
    """
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=POOL_WAIT_S)
    return redis.Redis(connection_pool=pool)


class PutOutcome(StrEnum):
    """What `put_if_absent` did: the idempotency verdict of an upload."""

    stored = "stored"  # the key was free; the blob is now there
    identical = "identical"  # the same bytes were already there: a harmless duplicate
    conflict = "conflict"  # different bytes were already there: refused, nothing changed


@runtime_checkable
class BlobStore(Protocol):
    """Write-once blobs with a time to live, and a blocking wait for a blob to appear."""

    def put_if_absent(self, key: str, data: bytes, ttl_s: float) -> PutOutcome:
        """Store `data` under `key` unless the key exists; never overwrites."""
        ...

    def get(self, key: str) -> bytes | None:
        """The blob under `key`, or None when absent or expired."""
        ...

    def wait_for(self, key: str, timeout_s: float) -> bytes | None:
        """Block until `key` exists (returning at once when it appears) or `timeout_s` passes."""
        ...

    def delete(self, key: str) -> None:
        """Remove `key` (no error when absent)."""
        ...

    def expire(self, keys: Sequence[str], ttl_s: float) -> None:
        """Let each of `keys` live at most `ttl_s` more seconds (never longer than it would have); absent
        keys are skipped. How consumed step messages leave the store long before their `blob_ttl_s`."""
        ...

    def replace(self, key: str, data: bytes, ttl_s: float) -> None:
        """Store `data` under `key`, overwriting it: small status records only (a privacy audit's progress);
        tensor blobs are write-once (`put_if_absent`). Waiters of `wait_for` are not woken."""
        ...


class InMemoryBlobStore:
    """The embedded default: a dict guarded by a `threading.Condition` that wakes waiters on every put."""

    def __init__(self) -> None:
        self._blobs: dict[str, tuple[bytes, float]] = {}  # key -> (data, expires at, monotonic seconds)
        self._changed = threading.Condition()

    def _live(self, key: str) -> bytes | None:
        entry = self._blobs.get(key)
        if entry is None:
            return None
        data, expires_at = entry
        if time.monotonic() >= expires_at:
            del self._blobs[key]
            return None
        return data

    def put_if_absent(self, key: str, data: bytes, ttl_s: float) -> PutOutcome:
        with self._changed:
            existing = self._live(key)
            if existing is not None:
                return PutOutcome.identical if existing == data else PutOutcome.conflict
            self._blobs[key] = (bytes(data), time.monotonic() + ttl_s)
            self._changed.notify_all()
            return PutOutcome.stored

    def get(self, key: str) -> bytes | None:
        with self._changed:
            return self._live(key)

    def wait_for(self, key: str, timeout_s: float) -> bytes | None:
        with self._changed:
            found: list[bytes] = []

            def arrived() -> bool:
                data = self._live(key)
                if data is not None:
                    found.append(data)
                return data is not None

            self._changed.wait_for(arrived, timeout=max(timeout_s, 0.0))
            return found[0] if found else None

    def delete(self, key: str) -> None:
        with self._changed:
            self._blobs.pop(key, None)

    def expire(self, keys: Sequence[str], ttl_s: float) -> None:
        with self._changed:
            deadline = time.monotonic() + max(ttl_s, 0.0)
            for key in keys:
                entry = self._blobs.get(key)
                if entry is not None:
                    self._blobs[key] = (entry[0], min(entry[1], deadline))

    def replace(self, key: str, data: bytes, ttl_s: float) -> None:
        with self._changed:
            self._blobs[key] = (bytes(data), time.monotonic() + ttl_s)


class RedisBlobStore:
    """Blobs in Redis (`SET NX PX`); each put also pushes a token on a notification list that waiters BLPOP.

    A waiter that pops the token pushes it back, so every other waiter on the same key wakes too; the
    list expires with the blob. Nothing polls: a waiter sleeps inside BLPOP until the put or the timeout.
    """

    def __init__(self, client: redis.Redis, namespace: str = "flglm:blob:") -> None:
        self._redis = client
        self._namespace = namespace

    @classmethod
    def from_url(
        cls, url: str, namespace: str = "flglm:blob:", max_connections: int = DEFAULT_MAX_CONNECTIONS
    ) -> RedisBlobStore:
        return cls(pooled_redis(url, max_connections), namespace)

    def _data_key(self, key: str) -> str:
        return f"{self._namespace}{key}"

    def _ready_key(self, key: str) -> str:
        return f"{self._namespace}{key}#ready"

    def put_if_absent(self, key: str, data: bytes, ttl_s: float) -> PutOutcome:
        ttl_ms = max(int(ttl_s * 1000), 1)
        if self._redis.set(self._data_key(key), data, nx=True, px=ttl_ms):
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(self._ready_key(key), b"1")
                pipe.pexpire(self._ready_key(key), ttl_ms)
                pipe.execute()
            return PutOutcome.stored
        existing = self._redis.get(self._data_key(key))
        if existing is None:  # expired between SET NX and GET: try once more as a fresh put
            return self.put_if_absent(key, data, ttl_s)
        return PutOutcome.identical if existing == data else PutOutcome.conflict

    def get(self, key: str) -> bytes | None:
        data = self._redis.get(self._data_key(key))
        return None if data is None else bytes(data)  # type: ignore[arg-type]

    def wait_for(self, key: str, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        while True:
            data = self.get(key)
            if data is not None:
                return data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # One BLPOP blocks server-side for at most BLPOP_SLICE_S: redis-py's socket timeout (5 s by
            # default) would cut a longer one. 0 would mean "forever", so keep a floor.
            popped = self._redis.blpop(
                [self._ready_key(key)], timeout=min(max(remaining, 0.01), BLPOP_SLICE_S)
            )
            if popped is None:
                continue
            data = self.get(key)
            if data is None:  # a stale token of an expired blob: it is consumed, keep waiting
                continue
            ttl_ms = self._redis.pttl(self._data_key(key))
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(self._ready_key(key), b"1")  # hand the token on to the next waiter
                pipe.pexpire(self._ready_key(key), ttl_ms if isinstance(ttl_ms, int) and ttl_ms > 0 else 1000)
                pipe.execute()
            return data

    def delete(self, key: str) -> None:
        self._redis.delete(self._data_key(key), self._ready_key(key))

    def expire(self, keys: Sequence[str], ttl_s: float) -> None:
        if not keys:
            return
        ttl_ms = max(int(ttl_s * 1000), 1)
        with self._redis.pipeline(transaction=False) as pipe:  # one round trip for all of them
            for key in keys:
                pipe.pexpire(self._data_key(key), ttl_ms, lt=True)  # LT: only ever shortens (Redis >= 7)
                pipe.pexpire(self._ready_key(key), ttl_ms, lt=True)
            pipe.execute()

    def replace(self, key: str, data: bytes, ttl_s: float) -> None:
        self._redis.set(self._data_key(key), data, px=max(int(ttl_s * 1000), 1))
