"""Replica slot leases on real Redis (database 11, the slot tests' own): claim, heartbeat, loss, release."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from tests.support.celery_workers import clear_slot_leases, run_flglm
from worker.runtime import pick_device
from worker.slots import NoFreeSlot, SlotClaim, read_slot_leases, slot_key

TTL_S = 0.6  # short, so that expiry and heartbeats happen within a test


@pytest.fixture
def slot_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/11")
    clear_slot_leases(client)
    yield client
    clear_slot_leases(client)
    client.close()


@pytest.fixture
def claims(slot_redis: redis.Redis) -> Iterator[list[SlotClaim]]:
    made: list[SlotClaim] = []
    yield made
    for claim in made:
        claim.release()


def new_claim(client: redis.Redis, made: list[SlotClaim], identity: str, ttl_s: float = TTL_S) -> SlotClaim:
    claim = SlotClaim(client, identity, ttl_s)
    made.append(claim)
    return claim


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_lowest_free_slot_then_release_makes_it_free_again(
    slot_redis: redis.Redis, claims: list[SlotClaim]
) -> None:
    first, second = new_claim(slot_redis, claims, "host-a"), new_claim(slot_redis, claims, "host-b")
    assert (first.claim(4), second.claim(4)) == (0, 1)
    assert [(lease.slot, lease.owner) for lease in read_slot_leases(slot_redis)] == [
        (0, first.owner),
        (1, second.owner),
    ]
    first.release()
    assert slot_redis.get(slot_key(0)) is None
    assert new_claim(slot_redis, claims, "host-c").claim(4) == 0
    second.release()
    second.release()  # twice is harmless
    assert [lease.slot for lease in read_slot_leases(slot_redis)] == [0]


def test_no_free_slot_is_a_clear_error(slot_redis: redis.Redis, claims: list[SlotClaim]) -> None:
    for identity in ("host-a", "host-b"):
        new_claim(slot_redis, claims, identity).claim(2)
    with pytest.raises(NoFreeSlot, match=r"no free replica slot among 0\.\.1 .*host-a#.*--max-replicas"):
        new_claim(slot_redis, claims, "host-c").claim(2)
    with pytest.raises(ValueError, match="at least 1"):
        new_claim(slot_redis, claims, "host-c").claim(0)


def test_release_never_deletes_someone_elses_lease(slot_redis: redis.Redis, claims: list[SlotClaim]) -> None:
    claim = new_claim(slot_redis, claims, "host-a")
    claim.claim(2)
    slot_redis.set(slot_key(0), "host-z#other")
    claim.release()
    assert slot_redis.get(slot_key(0)) == b"host-z#other"


def test_heartbeat_keeps_the_lease_past_its_ttl(slot_redis: redis.Redis, claims: list[SlotClaim]) -> None:
    claim = new_claim(slot_redis, claims, "host-a")
    claim.claim(2)
    lost: list[str] = []
    claim.start_heartbeat(lost.append)
    time.sleep(TTL_S * 3)
    assert slot_redis.get(slot_key(0)) == claim.owner.encode() and lost == []
    # An expiry nobody acted on (Redis unreachable for a while, no other worker): the lease comes back.
    slot_redis.delete(slot_key(0))
    assert wait_until(lambda: slot_redis.get(slot_key(0)) == claim.owner.encode())
    assert lost == []


def test_killed_workers_lease_expires_and_the_slot_is_claimed_again(
    slot_redis: redis.Redis, claims: list[SlotClaim]
) -> None:
    dead = new_claim(slot_redis, claims, "host-a")
    dead.claim(2)  # no heartbeat: like a process killed right after claiming
    assert new_claim(slot_redis, claims, "host-b").claim(2) == 1
    assert wait_until(lambda: slot_redis.get(slot_key(0)) is None)
    assert new_claim(slot_redis, claims, "host-c").claim(2) == 0


def test_lost_lease_is_reported_once(slot_redis: redis.Redis, claims: list[SlotClaim]) -> None:
    claim = new_claim(slot_redis, claims, "host-a")
    claim.claim(2)
    lost: list[str] = []
    reported = threading.Event()
    claim.start_heartbeat(lambda reason: (lost.append(reason), reported.set()))
    slot_redis.set(slot_key(0), "host-b#took-it-during-an-outage", px=60_000)
    assert reported.wait(10)
    assert len(lost) == 1 and "replica slot 0" in lost[0] and "taken by another worker" in lost[0]
    assert slot_redis.get(slot_key(0)) == b"host-b#took-it-during-an-outage"  # never taken back


def test_restarted_container_takes_back_its_own_dead_lease(
    slot_redis: redis.Redis, claims: list[SlotClaim]
) -> None:
    new_claim(slot_redis, claims, "host-z").claim(4)  # slot 0 belongs to someone else
    # The previous process of container host-a held slot 1 with a long lease and died (no more renewals).
    slot_redis.set(slot_key(1), "host-a#before-restart", px=60_000)
    restarted = new_claim(slot_redis, claims, "host-a")
    assert restarted.claim(4) == 1 and "taken back" in restarted.how
    assert slot_redis.get(slot_key(1)) == restarted.owner.encode()


def test_a_live_process_with_the_same_identity_keeps_its_slot(
    slot_redis: redis.Redis, claims: list[SlotClaim]
) -> None:
    alive = new_claim(slot_redis, claims, "same-host")
    alive.claim(4)
    alive.start_heartbeat(lambda reason: None)
    other = new_claim(slot_redis, claims, "same-host")
    assert other.claim(4) == 1 and other.how == "free"
    assert slot_redis.get(slot_key(0)) == alive.owner.encode()


def test_device_of_a_slot() -> None:
    assert pick_device(3, "cpu") == torch.device("cpu")  # FLGLM_WORKER_DEVICE wins
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for slot in range(5):
        expected = torch.device("cuda", slot % gpus) if gpus else torch.device("cpu")
        assert pick_device(slot) == expected


def test_auto_worker_without_redis_fails_clearly() -> None:
    done = run_flglm("redis://127.0.0.1:1/0", "worker", "--replica", "auto")
    assert done.returncode == 1 and "cannot claim a replica slot" in done.stderr
