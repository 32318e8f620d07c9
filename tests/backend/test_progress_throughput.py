"""Tokens / s of `GET /metrics/jobs/{id}/progress` is the clients' true throughput.

The clients of a `client_batch` job share one batched step, so they report it within milliseconds of each
other; those milliseconds are not the time the step took. The server's clock is pinned here so that every
report lands at a chosen instant.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import backend.metrics.endpoints as metric_endpoints
from tests.support.control_plane import Api, enroll, running_job

TOKENS = 2048  # per client and step: 8 rows of 256 tokens
STEP_S = 8.0  # one batched CPU step of the three clients
TRUE_RATE = 3 * TOKENS / STEP_S  # 768 tokens/s for the three clients together


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(metric_endpoints, "utc_now", clock)
    return clock


def report_batched_step(
    clock: Clock, agents: list[Any], job_id: int, step: int, started: datetime, **timings: float
) -> None:
    """The three clients report step `step` of round 1 as the batched step ends: 1 ms apart."""
    ended = started + timedelta(seconds=(step + 1) * STEP_S)
    for i, agent in enumerate(agents):
        clock.now = ended + timedelta(milliseconds=i)
        body = {
            "round_number": 1,
            "step": step,
            "loss": 2.0,
            "tokens": TOKENS,
            "phase_timings_s": timings or {"step": STEP_S},
        }
        agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json=body)


def test_one_batched_step_in_the_window_reads_its_step_time_not_the_milliseconds_between_reports(
    api: Api, clock: Clock
) -> None:
    agents = [enroll(api, name) for name in ("hospital-a", "hospital-b", "hospital-c")]
    job_id = running_job(api, agents, parallel_mode="client_batch")
    started = clock.now
    report_batched_step(clock, agents, job_id, 0, started)
    clock.now += timedelta(seconds=1)

    progress = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    # The old figure: 2 x 2048 tokens over the 2 ms between the first and the last report, 2,048,000 / s.
    assert progress["tokens_per_s"] == pytest.approx(TRUE_RATE, rel=1e-6)
    [replica] = progress["replicas"]
    assert replica["steps_in_window"] == 1  # the three clients' reports are one server step
    assert replica["tokens_per_s"] == pytest.approx(TRUE_RATE, rel=1e-6)


def test_several_batched_steps_read_each_clients_rate_summed(api: Api, clock: Clock) -> None:
    agents = [enroll(api, name) for name in ("site-a", "site-b", "site-c")]
    job_id = running_job(api, agents, parallel_mode="client_batch")
    started = clock.now
    for step in range(3):
        # Phases without a `step` timing (what other reporters send) count as their sum.
        report_batched_step(clock, agents, job_id, step, started, front=1.0, server=6.0, back=1.0)
    clock.now += timedelta(seconds=1)

    progress = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    # The old figure: 8 reports' tokens over the 16.002 s from the first report to the last, 1,024 / s.
    assert progress["tokens_per_s"] == pytest.approx(TRUE_RATE, rel=1e-3)
    assert progress["replicas"][0]["tokens_per_s"] == pytest.approx(TRUE_RATE, rel=1e-3)


def test_reports_that_arrive_together_are_no_burst(api: Api, clock: Clock) -> None:
    """A client whose two step reports reach the server 1 ms apart (say, after a stalled connection)
    produced them no faster than its own step timings say."""
    [agent] = [enroll(api, "laptop")]
    job_id = running_job(api, [agent])
    for step in range(2):
        clock.now += timedelta(milliseconds=1)
        body = {"round_number": 1, "step": step, "tokens": 500, "phase_timings_s": {"step": 5.0}}
        agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json=body)
    progress = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    assert progress["tokens_per_s"] == pytest.approx(100.0)


def test_no_report_in_the_window_reads_none(api: Api, clock: Clock) -> None:
    [agent] = [enroll(api, "idle")]
    job_id = running_job(api, [agent])
    body = {"round_number": 1, "step": 0, "tokens": 500, "phase_timings_s": {"step": 5.0}}
    agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json=body)
    clock.now += timedelta(minutes=5)
    assert api.ok("GET", f"/metrics/jobs/{job_id}/progress")["tokens_per_s"] is None
