"""`GET /agent/work?wait_s=…`: an idle agent's work request waits on the server and answers once one of its
jobs changes, holding no database connection meanwhile; `WorkSignal` wakes only the changed jobs' polls."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend.jobs.work_signal import WorkSignal
from flglm.protocol import MAX_WORK_WAIT_S, WORK_PATH
from tests.support.control_plane import Api, LiveServer, job_spec
from tests.support.step_agents import enroll_owner
from tests.support.step_clients import MODEL_REF


def test_a_waiting_work_request_answers_when_its_job_starts(live_server: LiveServer, api: Api) -> None:
    owner = enroll_owner(api, "long-poller", 1)
    agent = api.as_(owner.credential)
    spec = job_spec([owner.name], model_ref=MODEL_REF, task_type="generation", rounds=1, steps_per_round=1)
    job_id = api.ok("POST", "/jobs", 201, json={**spec, "start": "manual"})["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    agent.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    agent.ok("POST", "/agent/heartbeat", json={})
    assert agent.ok("GET", WORK_PATH, params={"wait_s": 0})["assignments"] == []
    with ThreadPoolExecutor(max_workers=1) as thread:
        began = time.monotonic()
        waiting = thread.submit(agent.get, WORK_PATH, params={"wait_s": 40})
        time.sleep(1.5)
        assert not waiting.done()  # nothing to do yet: the request waits
        api.ok("POST", f"/jobs/{job_id}/start")
        answer = waiting.result(timeout=60)
        answered_after = time.monotonic() - began
    assert answer.status_code == 200
    assert [(a["job_id"], a["round_number"]) for a in answer.json()["assignments"]] == [(job_id, 1)]
    assert answered_after < 30, f"woke after {answered_after:.1f} s, not when the job started"


def test_waiting_work_requests_hold_no_database_connection(live_server: LiveServer, api: Api) -> None:
    owner = enroll_owner(api, "idle-agent", 1)
    agent = api.as_(owner.credential)
    pool = live_server.app.state.engine.pool
    waiters = 24  # more than SQLite's QueuePool holds (5 + 10 overflow)
    with ThreadPoolExecutor(max_workers=waiters) as threads:
        polls = [threads.submit(agent.get, WORK_PATH, params={"wait_s": 4}) for _ in range(waiters)]
        held = []
        for _ in range(5):
            time.sleep(0.5)
            held.append(pool.checkedout())
        jobs = api.get("/jobs")
        answers = [poll.result(timeout=60) for poll in polls]
    assert min(held) == 0, f"pooled connections held by waiting work requests: {held}"
    assert jobs.status_code == 200
    assert [(a.status_code, a.json()["assignments"]) for a in answers] == [(200, [])] * waiters


@pytest.mark.parametrize("wait_s", [-1, MAX_WORK_WAIT_S + 1, "soon"])
def test_work_wait_is_bounded(live_server: LiveServer, api: Api, wait_s: object) -> None:
    owner = enroll_owner(api, "bounded", 1)
    answer = api.as_(owner.credential).get(WORK_PATH, params={"wait_s": wait_s})
    assert answer.status_code == 422 and "wait_s" in answer.text


def test_work_signal_wakes_only_the_changed_jobs_waiters() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        signal = WorkSignal()
        since = signal.epoch
        waiting_on_1 = asyncio.ensure_future(signal.wait([1], since, 30))
        waiting_on_2 = asyncio.ensure_future(signal.wait([2, 3], since, 30))
        await asyncio.sleep(0.05)
        assert signal.waiting() == 2
        signal.bump([3])  # from this loop's thread here; the backend bumps from its request threads
        await asyncio.wait_for(waiting_on_2, 5)
        one_still_waits = not waiting_on_1.done()
        # A change after `since` but before the wait began ends the wait at once.
        signal.bump([1])
        await asyncio.wait_for(signal.wait([1], since, 30), 5)
        await asyncio.wait_for(waiting_on_1, 5)
        late = signal.epoch
        await signal.wait([1], late, 0.05)  # nothing since: times out quietly
        return one_still_waits, waiting_on_2.done(), signal.waiting() == 0

    assert asyncio.run(scenario()) == (True, True, True)


def test_the_server_caps_the_wait(live_server: LiveServer, api: Api) -> None:
    """FLGLM_WORK_WAIT_MAX_S cuts a longer wait_s (a proxy in front may drop idle requests sooner)."""
    live_server.app.state.settings = live_server.app.state.settings.model_copy(
        update={"work_wait_max_s": 0.5}
    )
    owner = enroll_owner(api, "capped", 1)
    began = time.monotonic()
    answer = api.as_(owner.credential).get(WORK_PATH, params={"wait_s": 30})
    assert answer.status_code == 200 and answer.json()["assignments"] == []
    assert time.monotonic() - began < 15, "the 30 s wait_s was not cut to the server's 0.5 s"
