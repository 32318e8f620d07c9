"""Racing requests against a live HTTPS uvicorn: exactly one start, one round close, one next round."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx

from tests.support.control_plane import Api, LiveServer, enroll, job_spec, running_job

ATTEMPTS = 4


def _race(*calls: Callable[[], httpx.Response]) -> list[int]:
    """Run the calls at the same instant from separate threads; returns the sorted status codes."""
    barrier = threading.Barrier(len(calls))

    def go(call: Callable[[], httpx.Response]) -> int:
        barrier.wait()
        return call().status_code

    with ThreadPoolExecutor(len(calls)) as pool:
        return sorted(pool.map(go, calls))


def test_two_starts_of_one_job_have_exactly_one_winner(live_server: LiveServer) -> None:
    with live_server.client() as first, live_server.client() as second:
        api, api2 = Api(first), Api(second)
        agent = enroll(api, "race-start")
        for _ in range(ATTEMPTS):
            job_id = api.ok("POST", "/jobs", 201, json=job_spec(["race-start"]))["id"]
            api.ok("POST", f"/jobs/{job_id}/open")
            agent.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
            statuses = _race(
                partial(api.post, f"/jobs/{job_id}/start"), partial(api2.post, f"/jobs/{job_id}/start")
            )
            assert statuses == [200, 409]
            rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
            assert [r["number"] for r in rounds] == [1]
            starts = api.ok(
                "GET", "/audit", params={"object_type": "job", "object_id": str(job_id), "limit": 500}
            )
            assert [e["action"] for e in starts["items"]].count("job.start") == 1


def test_two_closes_of_one_round_have_exactly_one_winner(live_server: LiveServer) -> None:
    with live_server.client() as first, live_server.client() as second:
        api, api2 = Api(first), Api(second)
        a, b = enroll(api, "race-close-a"), enroll(api, "race-close-b")
        for _ in range(ATTEMPTS):
            job_id = running_job(api, [a, b], min_clients=1, rounds=3)
            a.api.ok("POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 1})
            statuses = _race(
                partial(api.post, f"/jobs/{job_id}/rounds/1/close"),
                partial(api2.post, f"/jobs/{job_id}/rounds/1/close"),
            )
            assert statuses == [200, 409]
            rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
            assert [(r["number"], r["status"]) for r in rounds] == [(1, "closed"), (2, "open")]
            api.ok("POST", f"/jobs/{job_id}/cancel")


def test_last_two_finishers_close_the_round_once(live_server: LiveServer) -> None:
    with live_server.client() as first, live_server.client() as second:
        api = Api(first)
        a = enroll(api, "race-done-a")
        b = enroll(api, "race-done-b")
        b_api = Api(second, b.credential)
        for _ in range(ATTEMPTS):
            job_id = running_job(api, [a, b], min_clients=2, rounds=2)
            statuses = _race(
                partial(a.api.post, f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 1}),
                partial(b_api.post, f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 1}),
            )
            assert statuses == [200, 200]
            rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
            assert [(r["number"], r["status"]) for r in rounds] == [(1, "closed"), (2, "open")]
            events = api.ok(
                "GET", "/audit", params={"object_type": "job", "object_id": str(job_id), "limit": 500}
            )
            assert [e["action"] for e in events["items"]].count("round.close") == 1
            api.ok("POST", f"/jobs/{job_id}/cancel")


def test_two_enrollment_tokens_for_one_new_name_have_exactly_one_winner(live_server: LiveServer) -> None:
    with live_server.client() as first, live_server.client() as second:
        api, api2 = Api(first), Api(second)
        for attempt in range(ATTEMPTS):
            body = {"name": f"race-name-{attempt}"}
            statuses = _race(
                partial(api.post, "/clients/enrollment-tokens", json=body),
                partial(api2.post, "/clients/enrollment-tokens", json=body),
            )
            # The loser either saw the pending client (201, a second token for it) or lost the insert (409).
            assert statuses in ([201, 201], [201, 409])
        names = [c["name"] for c in api.ok("GET", "/clients", params={"limit": 500})["items"]]
        assert sorted(names) == sorted(f"race-name-{i}" for i in range(ATTEMPTS))
