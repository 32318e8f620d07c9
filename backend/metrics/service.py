"""Recording step metrics (only for jobs the client approved) and artifacts; a job's live progress."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from backend.clients.service import is_online
from backend.errors import Conflict, InvalidInput
from backend.jobs.repository import ParticipantRepository
from backend.jobs.service import get_job, job_for_client
from backend.metrics.repository import (
    StepMetricRepository,
    StepMetricSummaryRepository,
)
from backend.metrics.schemas import ClientProgressView, JobProgressView, ReplicaLoadView
from backend.models import StepMetric
from flglm.protocol import ClientStatus, ConsentStatus, JobStatus, ParallelMode, StepMetricIn


class MetricForUnknownRound(Conflict):
    code = "metric_for_unknown_round"


class JobNotAcceptingMetrics(Conflict):
    code = "job_not_accepting_metrics"


class MetricBeyondThePlan(InvalidInput):
    code = "metric_beyond_the_plan"


def record_step_metric(
    session: Session, client_id: int, job_id: int, metric: StepMetricIn, now: datetime
) -> StepMetric:
    job = job_for_client(session, job_id, client_id, approved=True)
    if job.status not in (JobStatus.running, JobStatus.paused):
        raise JobNotAcceptingMetrics(f"job {job_id} is {job.status}")
    if metric.round_number > job.current_round:
        raise MetricForUnknownRound(f"round_number: job {job_id} is at round {job.current_round}")
    if metric.step >= job.steps_per_round:  # a round's steps are 0..steps_per_round-1: nothing else is stored
        raise MetricBeyondThePlan(f"step: job {job_id} has {job.steps_per_round} steps per round, 0-based")
    repository = StepMetricRepository(session)
    first = repository.find(job_id, client_id, metric.round_number, metric.step)
    if first is not None:
        return first  # a resend after an agent restart (or a retried step): the first report stands
    return repository.add(
        StepMetric(job_id=job_id, client_id=client_id, created_at=now, **metric.model_dump())
    )


def job_progress(
    session: Session,
    job_id: int,
    now: datetime,
    heartbeat_lease_s: float,
    replica_of: dict[int, int] | None = None,
    window_s: float = 60.0,
) -> JobProgressView:
    """Live progress of a job for the dashboard: per-client step and traffic, replica load, throughput.

    `replica_of` (client id -> replica) comes from the worker spec published at job start; before that,
    approved clients are dealt the way `WorkerJobSpec.replica_of` will deal them (round-robin by client id).
    Throughput is over the reports of the last `window_s` (an idle job reads None rather than a stale rate),
    each client's rate on its own clock, summed (`_tokens_per_s`).
    """
    job = get_job(session, job_id)
    summaries = StepMetricSummaryRepository(session)
    totals = {t.client_id: t for t in summaries.totals_per_client(job_id)}
    latest = {m.client_id: m for m in summaries.latest_per_client(job_id)}
    recent = summaries.reported_since(job_id, now - timedelta(seconds=window_s))
    participants = ParticipantRepository(session).list_for_job(job_id)
    if replica_of is None:
        approved = sorted(c.id for p, c in participants if p.consent == ConsentStatus.approved)
        replica_of = {client_id: i % job.replicas for i, client_id in enumerate(approved)}
    served = sorted(replica_of)
    clients = []
    for participant, client in participants:
        total = totals.get(client.id)
        last = latest.get(client.id)
        clients.append(
            ClientProgressView(
                client_id=client.id,
                client_name=client.name,
                client_status=ClientStatus(client.status),
                consent=ConsentStatus(participant.consent),
                online=is_online(client, now, heartbeat_lease_s),
                last_heartbeat_at=client.last_heartbeat_at,
                replica=replica_of.get(client.id),
                round_number=last.round_number if last else None,
                step=last.step if last else None,
                last_loss=last.loss if last else None,
                last_reported_at=last.created_at if last else None,
                steps_reported=total.steps_reported if total else 0,
                tokens=total.tokens if total else 0,
                wire_bytes_up=total.wire_bytes_up if total else 0,
                wire_bytes_down=total.wire_bytes_down if total else 0,
            )
        )
    live = job.status in (JobStatus.running, JobStatus.paused)  # an ended job has no live throughput
    replicas = [
        ReplicaLoadView(
            replica=index,
            client_ids=[cid for cid in served if replica_of[cid] == index],
            steps_in_window=_server_steps(
                mine := [m for m in recent if replica_of.get(m.client_id) == index],
                ParallelMode(job.parallel_mode),
            ),
            tokens_per_s=_tokens_per_s(mine) if live else None,
        )
        for index in range(job.replicas)
    ]
    return JobProgressView(
        job_id=job.id,
        status=JobStatus(job.status),
        current_round=job.current_round,
        rounds=job.rounds,
        steps_per_round=job.steps_per_round,
        window_s=window_s,
        tokens_per_s=_tokens_per_s(recent) if live else None,
        steps_reported=sum(t.steps_reported for t in totals.values()),
        tokens=sum(t.tokens for t in totals.values()),
        wire_bytes_up=sum(t.wire_bytes_up for t in totals.values()),
        wire_bytes_down=sum(t.wire_bytes_down for t in totals.values()),
        clients=clients,
        replicas=replicas,
        generated_at=now,
    )


def _server_steps(reports: list[StepMetric], mode: ParallelMode) -> int:
    """The training steps a replica ran for these client reports: one per report in `sequential`; in the
    batch modes the clients of one (round, step) share one forward and backward, so one per distinct step."""
    if mode is ParallelMode.sequential:
        return len(reports)
    return len({(m.round_number, m.step) for m in reports})


def _step_seconds(metric: StepMetric) -> float:
    """How long the client says the step took: the agent's `step` timing, else the sum of its timed phases."""
    timings = metric.phase_timings_s or {}
    if "step" in timings:
        return float(timings["step"])
    return float(sum(timings.values()))


def _client_tokens_per_s(reports: list[StepMetric]) -> float | None:
    """One client's tokens per second over its reports in the window.

    The time between its first and last report, with the first report's tokens left out (they were produced
    before that span began); never less than the step time the client itself measured for the steps counted,
    so reports that reach the server together (a resend, a stalled connection) are no burst of tokens. With a
    single report, or reports at the same instant: its tokens over its own measured step time.
    """
    ordered = sorted(reports, key=lambda m: (m.created_at, m.id))
    later = ordered[1:]
    if later:
        span_s = (ordered[-1].created_at - ordered[0].created_at).total_seconds()
        seconds = max(span_s, sum(_step_seconds(m) for m in later))
        if seconds > 0:
            return sum(m.tokens for m in later) / seconds
    seconds = sum(_step_seconds(m) for m in ordered)
    return sum(m.tokens for m in ordered) / seconds if seconds > 0 else None


def _tokens_per_s(reports: list[StepMetric]) -> float | None:
    """Tokens per second of all clients together: the sum of each client's own rate (`_client_tokens_per_s`).

    Never the window's tokens over the time from the first report to the last of any client: clients of a
    `client_batch` job report a shared step within milliseconds of each other, and those milliseconds are
    not the time the step took. None when no client's reports give a rate.
    """
    per_client: dict[int, list[StepMetric]] = {}
    for metric in reports:
        per_client.setdefault(metric.client_id, []).append(metric)
    rates = [rate for mine in per_client.values() if (rate := _client_tokens_per_s(mine)) is not None]
    return sum(rates) if rates else None
