"""One contract suite for every `BlobStore`: in-process and real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from flglm.contracts.blob_store import BlobStore, InMemoryBlobStore, PutOutcome, RedisBlobStore


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest) -> Iterator[BlobStore]:
    if request.param == "memory":
        yield InMemoryBlobStore()
        return
    url = request.getfixturevalue("redis_url")
    client = redis.Redis.from_url(url)
    yield RedisBlobStore(client, namespace=f"test-blob-{uuid.uuid4().hex}:")
    client.close()


def test_put_is_write_once_and_reports_duplicates(store: BlobStore) -> None:
    assert store.put_if_absent("k", b"one", ttl_s=30) is PutOutcome.stored
    assert store.put_if_absent("k", b"one", ttl_s=30) is PutOutcome.identical
    assert store.put_if_absent("k", b"two", ttl_s=30) is PutOutcome.conflict
    assert store.get("k") == b"one"
    assert store.get("missing") is None


def test_blob_expires_after_its_ttl(store: BlobStore) -> None:
    store.put_if_absent("short", b"x", ttl_s=0.2)
    assert store.get("short") == b"x"
    deadline = time.monotonic() + 5
    while store.get("short") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get("short") is None
    assert store.put_if_absent("short", b"y", ttl_s=30) is PutOutcome.stored


def test_delete_frees_the_key(store: BlobStore) -> None:
    store.put_if_absent("d", b"x", ttl_s=30)
    store.delete("d")
    assert store.get("d") is None
    store.delete("d")


def test_expire_only_ever_shortens_a_blobs_life(store: BlobStore) -> None:
    store.put_if_absent("consumed", b"x", ttl_s=30)
    store.put_if_absent("brief", b"y", ttl_s=0.2)
    store.expire(["consumed", "absent"], 0.2)  # 30 s -> 0.2 s; an absent key: no error, nothing created
    store.expire(["brief"], 30)  # never lengthened: still 0.2 s
    assert store.get("consumed") == b"x" and store.get("brief") == b"y"
    time.sleep(0.5)
    assert store.get("consumed") is None and store.get("brief") is None and store.get("absent") is None


def test_replace_overwrites_and_renews_the_ttl(store: BlobStore) -> None:
    store.replace("status", b"one", ttl_s=0.3)
    store.replace("status", b"two", ttl_s=0.3)
    assert store.get("status") == b"two"
    time.sleep(0.2)
    store.replace("status", b"three", ttl_s=0.3)  # a heartbeat: the record lives on
    time.sleep(0.2)
    assert store.get("status") == b"three"
    time.sleep(0.25)
    assert store.get("status") is None


def test_wait_for_returns_existing_blob_at_once(store: BlobStore) -> None:
    store.put_if_absent("here", b"data", ttl_s=30)
    assert store.wait_for("here", timeout_s=5) == b"data"


def test_wait_for_times_out_with_none(store: BlobStore) -> None:
    assert store.wait_for("never", timeout_s=0.3) is None


def test_wait_for_wakes_every_waiter_when_the_blob_lands(store: BlobStore) -> None:
    results: dict[int, bytes | None] = {}

    def wait(index: int) -> None:
        results[index] = store.wait_for("late", timeout_s=20)

    waiters = [threading.Thread(target=wait, args=(i,)) for i in range(3)]
    for thread in waiters:
        thread.start()
    time.sleep(0.3)  # let the waiters block first
    assert store.put_if_absent("late", b"payload", ttl_s=30) is PutOutcome.stored
    for thread in waiters:
        thread.join(timeout=20)
        assert not thread.is_alive()
    assert results == {0: b"payload", 1: b"payload", 2: b"payload"}
