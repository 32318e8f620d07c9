"""Replica slot leases in Redis: `flglm worker --replica auto` claims the lowest free slot and keeps it.

A replica's autograd graph lives in one process, so two processes must never consume the same replica
queue. Each auto worker therefore holds a lease `flglm:worker-slot:<slot>` = `<identity>#<token>` (SET NX
PX ttl), renewed every ttl/3 by a heartbeat thread and deleted on clean shutdown; a killed worker's slot
frees itself when the TTL runs out. The identity (FLGLM_WORKER_IDENTITY, default the hostname, which is
the container id under docker compose) lets a restarted container take its own slot back at once, but
only after watching the old lease for one heartbeat interval without a renewal: a second live process
with the same identity keeps its slot. A heartbeat that finds its slot owned by someone else (a Redis
outage longer than the TTL let another worker take it) reports the loss; the worker then exits.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

SLOT_KEY_PREFIX = "flglm:worker-slot:"
# A worker whose lease was taken exits with this status (compose restarts it; it claims a new slot).
LEASE_LOST_EXIT_CODE = 3

# Renew only our own lease; recreate it when it expired and nobody took it (1), report a foreign owner (0).
_RENEW = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if owner == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


class NoFreeSlot(RuntimeError):
    """Every slot below --max-replicas is leased by a live worker."""


def slot_key(slot: int) -> str:
    return f"{SLOT_KEY_PREFIX}{slot}"


def default_identity() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class SlotLease:
    """One leased slot as an operator sees it (`flglm worker slots`)."""

    slot: int
    owner: str
    ttl_s: float


def _owner_and_ttl_ms(client: redis.Redis, key: str) -> tuple[bytes | None, int]:
    """A lease's value and milliseconds left, read atomically."""
    with client.pipeline() as pipe:
        pipe.get(key)
        pipe.pttl(key)
        owner, ttl_ms = pipe.execute()
    return owner, int(ttl_ms)


def read_slot_leases(client: redis.Redis) -> list[SlotLease]:
    """Every live lease, by slot."""
    leases = []
    for raw_key in client.scan_iter(match=f"{SLOT_KEY_PREFIX}*"):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        suffix = key.removeprefix(SLOT_KEY_PREFIX)
        owner, ttl_ms = _owner_and_ttl_ms(client, key)
        if suffix.isdigit() and owner is not None:
            leases.append(SlotLease(int(suffix), owner.decode(), max(ttl_ms, 0) / 1000))
    return sorted(leases, key=lambda lease: lease.slot)


class SlotClaim:
    """The lease on one replica slot held by this process, with the heartbeat that keeps it."""

    def __init__(self, client: redis.Redis, identity: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("the slot lease TTL must be positive")
        self.client, self.identity, self.ttl_s = client, identity, ttl_s
        self.owner = f"{identity}#{secrets.token_hex(8)}"
        self.slot: int | None = None
        self.how = ""  # how the slot was claimed: free, or taken back from a dead predecessor
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def ttl_ms(self) -> int:
        return max(int(self.ttl_s * 1000), 1)

    @property
    def renew_interval_s(self) -> float:
        return self.ttl_s / 3

    def claim(self, max_slots: int) -> int:
        """Lease the lowest free slot below max_slots (this identity's own dead lease first)."""
        if max_slots < 1:
            raise ValueError("--max-replicas must be at least 1")
        own = [lease for lease in read_slot_leases(self.client) if self._is_own_identity(lease.owner)]
        for lease in own:
            if lease.slot < max_slots and self._take_over_if_dead(lease.slot, lease.owner):
                return self._claimed(lease.slot, f"taken back from {lease.owner}, whose heartbeat stopped")
        for slot in range(max_slots):
            if self.client.set(slot_key(slot), self.owner, nx=True, px=self.ttl_ms):
                return self._claimed(slot, "free")
        holders = ", ".join(f"{lease.slot}: {lease.owner}" for lease in read_slot_leases(self.client))
        raise NoFreeSlot(
            f"no free replica slot among 0..{max_slots - 1} (leased: {holders}); raise --max-replicas, "
            f"stop a worker, or wait up to {self.ttl_s:g} s for a killed worker's lease to expire"
        )

    def _is_own_identity(self, owner: str) -> bool:
        return owner.rpartition("#")[0] == self.identity

    def _take_over_if_dead(self, slot: int, seen_owner: str) -> bool:
        """Watch the lease for one renew interval (and a bit); a holder that renews it is alive."""
        key, deadline = slot_key(slot), time.monotonic() + self.renew_interval_s * 1.5 + 0.2
        last_ttl_ms = int(self.client.pttl(key))
        while time.monotonic() < deadline:
            time.sleep(min(0.1, self.renew_interval_s / 10))
            owner, ttl_ms = _owner_and_ttl_ms(self.client, key)
            if owner is None or owner.decode() != seen_owner or ttl_ms > last_ttl_ms:
                return False  # renewed (alive), released or taken: not ours to take
            last_ttl_ms = ttl_ms
        return bool(self.client.eval(_TAKE_OVER, 1, key, seen_owner, self.owner, self.ttl_ms))

    def _claimed(self, slot: int, how: str) -> int:
        self.slot = slot
        self.how = how
        log.info("claimed replica slot %s as %s (%s; lease TTL %g s)", slot, self.owner, how, self.ttl_s)
        return slot

    def renew(self) -> bool:
        """Extend the lease (or recreate it if it expired unclaimed); False when another owner holds it."""
        assert self.slot is not None, "claim() first"
        return bool(self.client.eval(_RENEW, 1, slot_key(self.slot), self.owner, self.ttl_ms))

    def start_heartbeat(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ttl/3 in a daemon thread; call on_lost(reason) once if the lease is taken."""
        self._heartbeat = threading.Thread(
            target=self._beat, args=(on_lost,), name="flglm-slot-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def _beat(self, on_lost: Callable[[str], None]) -> None:
        interval = self.renew_interval_s
        while not self._stop.wait(interval):
            try:
                kept = self.renew()
            except redis.RedisError as exc:
                # Keep trying, faster, so that a lease taken during the outage is noticed soon after.
                log.warning("could not renew the lease of replica slot %s: %s", self.slot, exc)
                interval = min(self.renew_interval_s, 1.0)
                continue
            interval = self.renew_interval_s
            if not kept:
                on_lost(f"the lease of replica slot {self.slot} ({self.owner}) was taken by another worker")
                return

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (clean shutdown)."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        if self.slot is not None:
            try:
                self.client.eval(_RELEASE, 1, slot_key(self.slot), self.owner)
                log.warning("released replica slot %s", self.slot)
            except redis.RedisError as exc:  # the lease expires by itself
                log.warning("could not release replica slot %s: %s", self.slot, exc)
