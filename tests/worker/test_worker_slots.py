"""Real `flglm worker --replica auto` processes on real Redis (database 11), as `--scale worker=N` runs them.

Each process gets its own FLGLM_WORKER_IDENTITY, as each compose container has its own hostname, and a
short lease TTL so that a killed worker's slot frees itself within the test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from flglm.contracts.tasks import ADMISSION_QUEUE, PRIVACY_QUEUE
from flglm.step_protocol import DEFAULT_QUEUE, replica_queue
from flglm.wire.keys import generate_private_key, save_private_key
from tests.support.celery_workers import WorkerProcesses, clear_slot_leases, run_flglm
from worker.slots import LEASE_LOST_EXIT_CODE, read_slot_leases, slot_key

pytestmark = pytest.mark.slow
LEASE_TTL_S = "2"
WAIT_S = 90.0  # bound on waits for process start-up (torch import on a busy machine), never asserted


@pytest.fixture
def slot_redis_url(redis_url: str) -> Iterator[str]:
    url = redis_url.rsplit("/", 1)[0] + "/11"
    client = redis.Redis.from_url(url)
    clear_slot_leases(client)
    for key in client.scan_iter("flglm.*"):  # queues of an interrupted run
        client.delete(key)
    client.close()
    yield url


@pytest.fixture
def workers(tmp_path: Path, slot_redis_url: str) -> Iterator[WorkerProcesses]:
    key_file = tmp_path / "server.key"
    save_private_key(generate_private_key(), key_file)
    processes = WorkerProcesses(slot_redis_url, key_file, tmp_path)
    yield processes
    processes.stop_all()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def start_auto(workers: WorkerProcesses, identity: str, max_replicas: int = 2) -> subprocess.Popen[bytes]:
    env = {"FLGLM_WORKER_IDENTITY": identity, "FLGLM_SLOT_LEASE_TTL_S": LEASE_TTL_S}
    return workers.start("auto", options=["--max-replicas", str(max_replicas)], env=env)


def slot_of(client: redis.Redis, identity: str) -> int | None:
    held = [lease.slot for lease in read_slot_leases(client) if lease.owner.startswith(f"{identity}#")]
    assert len(held) <= 1, f"{identity} holds several slots: {held}"
    return held[0] if held else None


def claimed_slot(client: redis.Redis, identity: str) -> int:
    wait_for(lambda: slot_of(client, identity) is not None, f"{identity} to claim a slot")
    slot = slot_of(client, identity)
    assert slot is not None
    return slot


def log_text(workers: WorkerProcesses, index: int) -> str:
    return workers.log_path(index).read_text(errors="replace")


def slots_command(redis_url: str) -> dict[str, list[dict[str, object]]]:
    done = run_flglm(redis_url, "worker", "slots", "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, list[dict[str, object]]] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_auto_workers_claim_distinct_slots_free_them_and_never_share_one(
    workers: WorkerProcesses, slot_redis_url: str
) -> None:
    client = redis.Redis.from_url(slot_redis_url)
    first, second = start_auto(workers, "host-a"), start_auto(workers, "host-b")
    slots = {
        "host-a": claimed_slot(client, "host-a"),
        "host-b": claimed_slot(client, "host-b"),
    }
    assert sorted(slots.values()) == [0, 1]
    wait_for(lambda: "claimed replica slot" in log_text(workers, 0), "the claim in worker 0's log")
    assert f"claimed replica slot {slots['host-a']} as host-a#" in log_text(workers, 0)
    listed = slots_command(slot_redis_url)["slots"]
    assert [(entry["slot"], str(entry["owner"]).split("#")[0]) for entry in listed] == sorted(
        (slot, identity) for identity, slot in slots.items()
    )

    # Each consumes its own slot's queue (and the stateless admission, default and privacy-audit queues).
    app = Celery("flglm-slots-test", broker=slot_redis_url, backend=slot_redis_url)
    queues: dict[str, list[str]] = {}

    def both_answer() -> bool:
        answer = app.control.inspect(timeout=2).active_queues() or {}
        queues.update({node: sorted(q["name"] for q in found) for node, found in answer.items()})
        return {workers.node_name(0), workers.node_name(1)} <= set(queues)

    wait_for(both_answer, "both workers to answer a Celery inspect")
    app.close()
    for index, identity in enumerate(("host-a", "host-b")):
        expected = [ADMISSION_QUEUE, DEFAULT_QUEUE, PRIVACY_QUEUE, replica_queue(slots[identity])]
        assert queues[workers.node_name(index)] == sorted(expected)

    # A third worker finds no free slot under --max-replicas 2: it fails at once, saying why.
    third = start_auto(workers, "host-c")
    assert third.wait(timeout=WAIT_S) == 1
    assert "no free replica slot among 0..1" in log_text(workers, 2)
    assert slot_of(client, "host-c") is None

    # A killed worker's lease outlives it until the TTL, then its slot is claimed by the next worker.
    workers.kill(first)
    wait_for(lambda: client.get(slot_key(slots["host-a"])) is None, "the killed worker's lease to expire")
    start_auto(workers, "host-d")
    assert claimed_slot(client, "host-d") == slots["host-a"]

    # A clean stop (SIGTERM, what `docker compose stop` sends) releases the slot at once; it is reused.
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=WAIT_S) == 0
    assert client.get(slot_key(slots["host-b"])) is None  # released, not left to expire
    start_auto(workers, "host-e")
    assert claimed_slot(client, "host-e") == slots["host-b"]

    # A lease taken by another worker (a Redis outage longer than the TTL) stops the worker: exit 3.
    fourth = workers.processes[3]
    client.set(slot_key(slots["host-a"]), "host-x#took-it-during-an-outage", px=60_000)
    assert fourth.wait(timeout=WAIT_S) == LEASE_LOST_EXIT_CODE
    assert "was taken by another worker" in log_text(workers, 3)
    assert client.get(slot_key(slots["host-a"])) == b"host-x#took-it-during-an-outage"
    client.close()


def active_queues(redis_url: str, node: str) -> list[str]:
    """The queues a running worker node consumes, from a Celery inspect ([] until it answers)."""
    app = Celery("flglm-queues-test", broker=redis_url, backend=redis_url)
    try:
        answer = app.control.inspect(timeout=2, destination=[node]).active_queues() or {}
    finally:
        app.close()
    return sorted(queue["name"] for queue in answer.get(node, []))


def test_a_queue_worker_serves_the_stateless_queues_on_threads_and_no_replica(
    workers: WorkerProcesses, slot_redis_url: str
) -> None:
    """`flglm worker --replica none` (the compose `queues` service): admission, FedAvg and audits, no replica
    queue, several threads, and no slot lease (it serves no replica)."""
    workers.start("none", options=["--pool", "threads", "--concurrency", "3"])
    queues: list[str] = []

    def answered() -> bool:
        queues[:] = active_queues(slot_redis_url, workers.node_name(0))
        return bool(queues)

    wait_for(answered, "the queue worker to answer a Celery inspect")
    assert queues == sorted([ADMISSION_QUEUE, DEFAULT_QUEUE, PRIVACY_QUEUE])
    assert read_slot_leases(redis.Redis.from_url(slot_redis_url)) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--replica", "none", "--replica", "0"], "--replica none takes no other --replica"),
        (["--replica", "0", "--pool", "threads", "--concurrency", "2"], "--concurrency > 1 needs --replica"),
        (["--replica", "none", "--concurrency", "2"], "--concurrency > 1 needs --replica"),
        (
            ["--replica", "none", "--no-default-queue", "--no-admission-queue", "--no-privacy-queue"],
            "would consume no queue",
        ),
    ],
)
def test_worker_options_that_cannot_work_are_refused_before_anything_starts(
    options: list[str], message: str
) -> None:
    done = run_flglm("redis://127.0.0.1:1/0", "worker", *options)
    assert done.returncode == 2 and message in " ".join(done.stderr.split()), done.stderr
