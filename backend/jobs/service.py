"""Job use cases: submission, invitations and consent, lifecycle transitions, rounds and their policies.

Lock order everywhere: the job row first, then the round row (`SELECT ... FOR UPDATE` on Postgres). Every
state change is a conditional UPDATE (`... WHERE status = expected`), so of two racers exactly one wins on
both databases; the loser gets a 409.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from backend.audit.service import record
from backend.clients.repository import ClientRepository
from backend.errors import Conflict, Forbidden, Gone, InvalidInput, NotFound
from backend.jobs.after_commit import note_dropped
from backend.jobs.lifecycle import CONSENT_OPEN_STATES, TERMINAL_STATES, TRANSITIONS
from backend.jobs.repository import JobRepository, ParticipantRepository, RoundRepository
from backend.models import Client, Job, JobParticipant, Round, RoundParticipant
from backend.privacy.matching import audited_figure
from backend.server_keys import create_job_key, delete_job_key
from flglm.protocol import (
    AgentFailureResponse,
    AgentJobView,
    ClientStatus,
    ConsentDecision,
    ConsentStatus,
    InvitationView,
    JobSpec,
    JobStatus,
    RoundDoneRequest,
    RoundDoneResponse,
    RoundParticipantStatus,
    RoundStatus,
    StragglerPolicy,
    WorkAssignment,
)

SYSTEM = "system"


class JobNotFound(NotFound):
    code = "job_not_found"


class IllegalTransition(Conflict):
    code = "illegal_transition"


class NotEnoughParticipants(Conflict):
    code = "not_enough_participants"


class UnknownClients(InvalidInput):
    code = "unknown_clients"


class ConsentClosed(Conflict):
    code = "consent_closed"


class RoundNotFound(NotFound):
    code = "round_not_found"


class StaleRound(Conflict):
    code = "stale_round"


class NotRoundParticipant(Forbidden):
    code = "not_round_participant"


class JobNotRunning(Conflict):
    code = "job_not_running"


class JobKeyDeleted(Gone):
    code = "job_key_deleted"


# --- operator side --------------------------------------------------------------------------------


def get_job(session: Session, job_id: int, *, for_update: bool = False) -> Job:
    job = JobRepository(session).get(job_id, for_update=for_update)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    return job


def create_job(session: Session, actor: str, spec: JobSpec, now: datetime) -> Job:
    """A draft job inviting `spec.clients`; unknown or revoked clients are refused before the row is added,
    so a refused submission takes no job id (PostgreSQL's sequence does not roll back)."""
    invited = _invitable(session, spec.clients)
    job = JobRepository(session).add(
        Job(
            name=spec.name,
            model_ref=spec.model_ref,
            task_type=spec.task_type.value,
            split_plan=spec.split_plan.model_dump(),
            adapter=spec.adapter.model_dump(mode="json"),
            hyperparameters=spec.hyperparameters.model_dump(mode="json"),  # every value, defaults too
            privacy=spec.privacy.model_dump(),
            parallel_mode=spec.parallel_mode.value,
            replicas=spec.replicas,
            rounds=spec.rounds,
            steps_per_round=spec.steps_per_round,
            min_clients=spec.min_clients,
            round_timeout_s=spec.round_timeout_s,
            straggler_policy=spec.straggler_policy.value,
            start=spec.start.value,
            status=JobStatus.draft,
            current_round=0,
            created_by=actor,
            created_at=now,
            updated_at=now,
        )
    )
    record(session, actor, "job.create", "job", job.id, {"name": spec.name, "model_ref": spec.model_ref})
    _add_invitations(session, actor, job, invited, now)
    return job


def invite_clients(session: Session, actor: str, job_id: int, names: list[str], now: datetime) -> Job:
    job = get_job(session, job_id, for_update=True)
    if job.status not in CONSENT_OPEN_STATES:
        raise ConsentClosed(f"job {job.id} is {job.status}; clients can only be invited before it starts")
    _invite(session, actor, job, names, now)
    return job


def _invite(session: Session, actor: str, job: Job, names: list[str], now: datetime) -> None:
    _add_invitations(session, actor, job, _invitable(session, names), now)


def _invitable(session: Session, names: list[str]) -> list[Client]:
    """The clients of `names`; UnknownClients when one is unknown or revoked."""
    if not names:
        return []
    clients = ClientRepository(session).get_by_names(names)
    missing = sorted(set(names) - {client.name for client in clients})
    if missing:
        raise UnknownClients(
            f"clients: unknown client names {missing} (create enrollment tokens for them first)"
        )
    revoked = sorted(client.name for client in clients if client.status == ClientStatus.revoked)
    if revoked:
        raise UnknownClients(f"clients: revoked clients cannot be invited: {revoked}")
    return list(clients)


def _add_invitations(session: Session, actor: str, job: Job, clients: list[Client], now: datetime) -> None:
    participants = ParticipantRepository(session)
    for client in clients:
        if participants.get(job.id, client.id) is None:
            participants.add(
                JobParticipant(
                    job_id=job.id, client_id=client.id, consent=ConsentStatus.invited, invited_at=now
                )
            )
            record(session, actor, "job.invite", "job", job.id, {"client_id": client.id})
    session.flush()


def transition(
    session: Session,
    actor: str,
    job_id: int,
    action: str,
    now: datetime,
    job_keys_dir: Path | None = None,
) -> Job:
    """Apply an operator action (`open`, `start`, `pause`, `resume`, `cancel`); illegal ones raise 409.

    `open` gives the job its own server key pair in `job_keys_dir` (see `backend.server_keys` for why at
    open, and why a rollback leaves nothing usable); without a directory it keeps the deployment key.
    """
    allowed_from, target = TRANSITIONS[action]
    job = get_job(session, job_id, for_update=True)
    previous = job.status
    if previous not in allowed_from:
        raise IllegalTransition(f"cannot {action} job {job.id}: it is {previous}")
    approved: list[int] = []
    if action == "start":
        approved = ParticipantRepository(session).approved_active_client_ids(job.id)
        if len(approved) < job.min_clients:
            raise NotEnoughParticipants(
                f"job {job.id} has {len(approved)} approved, online clients; min_clients is {job.min_clients}"
            )
    if not JobRepository(session).set_status_if(job.id, allowed_from, target, updated_at=now):
        raise IllegalTransition(f"cannot {action} job {job.id}: its state changed concurrently")
    record(session, actor, f"job.{action}", "job", job.id, {"from": previous, "to": target.value})
    job = get_job(session, job_id)
    rounds = RoundRepository(session)
    if action == "open" and job_keys_dir is not None and job.server_public_key is None:
        # Only the winner of the conditional update above gets here: one key per job.
        job.server_public_key = create_job_key(job_keys_dir, job.id)
        record(session, actor, "job.server_key_created", "job", job.id, {"public_key": job.server_public_key})
    if action == "start":
        _open_round(session, job, 1, approved, now)
    elif action == "resume":
        open_round = rounds.open_round(job.id)
        if open_round is not None:  # the clock stood still while paused
            open_round.deadline_at = now + timedelta(seconds=job.round_timeout_s)
    elif action == "cancel":
        open_round = rounds.open_round(job.id)
        if open_round is not None:
            rounds.set_status_if_open(
                open_round.id, RoundStatus.failed, closed_at=now, close_reason="job cancelled"
            )
    session.flush()
    return get_job(session, job_id)


def close_round_now(session: Session, actor: str, job_id: int, number: int, now: datetime) -> Round:
    """Operator closes an open round early: the job's straggler policy decides (drop unfinished, or fail)."""
    job = get_job(session, job_id, for_update=True)
    round_ = _get_round(session, job.id, number, for_update=True)
    if round_.status != RoundStatus.open:
        raise StaleRound(f"round {number} of job {job_id} is already {round_.status}")
    if job.status != JobStatus.running:
        raise JobNotRunning(f"job {job_id} is {job.status}")
    if not _apply_round_policy(session, job, round_, now, f"closed by {actor}"):
        raise StaleRound(f"round {number} of job {job_id} was closed concurrently")
    record(session, actor, "round.close_request", "job", job.id, {"round": number})
    return _get_round(session, job.id, number)


def enforce_round_deadlines(session: Session, now: datetime) -> list[tuple[int, int]]:
    """Apply the straggler policy to every open round of a running job whose deadline has passed."""
    handled = []
    for job_id, number in RoundRepository(session).overdue_open_round_ids(now):
        job = get_job(session, job_id, for_update=True)
        round_ = _get_round(session, job_id, number, for_update=True)
        if job.status != JobStatus.running or round_.status != RoundStatus.open or round_.deadline_at >= now:
            continue
        if _apply_round_policy(session, job, round_, now, "deadline passed"):
            handled.append((job_id, number))
    return handled


def delete_expired_job_keys(
    session: Session, now: datetime, retention_s: float, job_keys_dir: Path
) -> list[int]:
    """Forward secrecy: delete the server key file of every job that ended more than `retention_s` ago.

    The file goes first, then the row notes it; a rollback after the unlink leaves the row unmarked and
    the next pass marks it (the unlink is idempotent). Afterwards the job's uploads get `JobKeyDeleted`.
    """
    deleted = []
    for job_id in JobRepository(session).ended_with_server_key(now - timedelta(seconds=retention_s)):
        job = get_job(session, job_id, for_update=True)
        if job.server_key_deleted_at is not None or job.status not in TERMINAL_STATES:
            continue
        file_existed = delete_job_key(job_keys_dir, job.id)
        job.server_key_deleted_at = now
        record(
            session,
            SYSTEM,
            "job.server_key_deleted",
            "job",
            job.id,
            {"retention_s": retention_s, "file_existed": file_existed},
        )
        deleted.append(job.id)
    session.flush()
    return deleted


def ensure_server_key_available(job: Job) -> None:
    """409/410-style refusal for a job whose server key was deleted: nobody can open its messages now."""
    if job.server_key_deleted_at is not None:
        raise JobKeyDeleted(
            f"job {job.id}'s server key was deleted at {job.server_key_deleted_at.isoformat()} "
            "(its retention after the job ended ran out); its messages can no longer be opened"
        )


def drop_client_from_open_rounds(
    session: Session, client_id: int, reason: str, now: datetime, job_id: int | None = None
) -> None:
    """A client went offline or was revoked (every job), or withdrew from one job (`job_id`): drop it from
    those open rounds and apply each job's straggler policy."""
    rounds = RoundRepository(session)
    for open_job_id, number in rounds.open_rounds_with_client(client_id):
        if job_id is not None and open_job_id != job_id:
            continue  # withdrawing from one job leaves the client's other jobs alone
        job = get_job(session, open_job_id, for_update=True)
        round_ = _get_round(session, open_job_id, number, for_update=True)
        participant = rounds.participant(round_.id, client_id)
        if round_.status != RoundStatus.open or participant is None:
            continue
        if participant.status != RoundParticipantStatus.active:
            continue
        participant.status = RoundParticipantStatus.dropped
        participant.drop_reason = reason
        note_dropped(session, job.id, client_id)
        session.flush()
        record(session, SYSTEM, "round.drop_client", "job", job.id, {"round": number, "client_id": client_id})
        if job.status != JobStatus.running:
            continue
        remaining = [p for p in rounds.participants(round_.id) if p.status != RoundParticipantStatus.dropped]
        if job.straggler_policy == StragglerPolicy.fail or len(remaining) < job.min_clients:
            why = f"client {client_id} {reason}; {len(remaining)} left, min_clients={job.min_clients}"
            if rounds.set_status_if_open(round_.id, RoundStatus.failed, closed_at=now, close_reason=why):
                _fail_job(session, job, f"round {number}: {why}", now)
        elif all(p.status == RoundParticipantStatus.finished for p in remaining):
            _close_and_advance(session, job, round_, now, "all remaining participants finished")


# --- agent side -----------------------------------------------------------------------------------


def job_for_client(session: Session, job_id: int, client_id: int, *, approved: bool = False) -> Job:
    """The job as a client may see it: 404 unless it is invited (and, if asked, approved) and not a draft."""
    job = JobRepository(session).get(job_id)
    participant = ParticipantRepository(session).get(job_id, client_id)
    visible = job is not None and participant is not None and job.status != JobStatus.draft
    if not visible or (
        approved and participant is not None and participant.consent != ConsentStatus.approved
    ):
        raise JobNotFound(f"job {job_id} not found among this client's {'approved ' if approved else ''}jobs")
    assert job is not None
    return job


def list_invitations(session: Session, client_id: int) -> list[InvitationView]:
    visible = [status for status in JobStatus if status != JobStatus.draft]
    rows = ParticipantRepository(session).list_for_client(client_id, job_statuses=visible)
    return [_invitation_view(session, job, participant) for participant, job in rows]


def decide(
    session: Session, client_id: int, actor: str, job_id: int, decision: ConsentDecision, now: datetime
) -> InvitationView:
    """A data owner approves (before the start) or declines (any time before the end: a withdrawal)."""
    job_for_client(session, job_id, client_id)  # 404 unless invited
    job = get_job(session, job_id, for_update=True)
    participant = ParticipantRepository(session).get(job_id, client_id)
    assert participant is not None
    if decision is ConsentDecision.approve and job.status != JobStatus.waiting_for_clients:
        raise ConsentClosed(
            f"job {job_id} is {job.status}; approvals are accepted while it waits for clients"
        )
    if job.status in TERMINAL_STATES:
        raise ConsentClosed(f"job {job_id} is {job.status}")
    new = ConsentStatus.approved if decision is ConsentDecision.approve else ConsentStatus.declined
    if participant.consent != new:
        participant.consent = new
        participant.decided_at = now
        session.flush()
        record(session, actor, f"job.consent.{new.value}", "job", job_id, {"client_id": client_id})
        if new is ConsentStatus.declined:
            drop_client_from_open_rounds(session, client_id, "withdrew consent", now, job_id=job_id)
    return _invitation_view(session, get_job(session, job_id), participant)


def agent_job_view(session: Session, client_id: int, job_id: int, server_public_key: str) -> AgentJobView:
    job = job_for_client(session, job_id, client_id)
    participant = ParticipantRepository(session).get(job_id, client_id)
    assert participant is not None
    return _agent_job_view(session, job, participant, server_public_key)


def work_for(session: Session, client_id: int, server_public_key: str) -> list[WorkAssignment]:
    """Open rounds this client takes part in; only jobs it approved and that are running."""
    rounds = RoundRepository(session)
    assignments = []
    rows = ParticipantRepository(session).list_for_client(
        client_id, job_statuses=[JobStatus.running], consent=ConsentStatus.approved
    )
    for participant, job in rows:
        round_ = rounds.open_round(job.id)
        if round_ is None:
            continue
        mine = rounds.participant(round_.id, client_id)
        if mine is None or mine.status != RoundParticipantStatus.active:
            continue
        assignments.append(
            WorkAssignment(
                job_id=job.id,
                round_number=round_.number,
                steps=job.steps_per_round,
                deadline_at=round_.deadline_at,
                job=_agent_job_view(session, job, participant, server_public_key),
            )
        )
    return assignments


def report_round_done(
    session: Session,
    client_id: int,
    actor: str,
    job_id: int,
    number: int,
    report: RoundDoneRequest,
    now: datetime,
) -> RoundDoneResponse:
    """A participant finished its steps of a round; the last one to finish closes the round.

    Repeating the same report is harmless (idempotent): it answers the current state. A repeated report of a
    finished participant may add eval metrics, even after the round closed: the agent evaluates the
    round's FedAvg'd model once it downloaded it, which is after its first report (the round must not wait
    on evaluation). The example count stays the first one.
    """
    job_for_client(session, job_id, client_id, approved=True)
    job = get_job(session, job_id, for_update=True)
    round_ = _get_round(session, job_id, number, for_update=True)
    rounds = RoundRepository(session)
    participant = rounds.participant(round_.id, client_id)
    if participant is None:
        raise NotRoundParticipant(
            f"client {client_id} is not a participant of round {number} of job {job_id}"
        )
    if participant.status == RoundParticipantStatus.finished:
        merged = {**(participant.eval_metrics or {}), **report.eval_metrics}
        if merged != (participant.eval_metrics or {}):
            participant.eval_metrics = merged  # a new dict: the JSON column sees the change
            session.flush()
        return _round_done_response(session, job_id, number)
    if participant.status == RoundParticipantStatus.dropped:
        raise StaleRound(f"client {client_id} was dropped from round {number}: {participant.drop_reason}")
    if round_.status != RoundStatus.open:
        raise StaleRound(f"round {number} of job {job_id} is {round_.status}")
    if job.status != JobStatus.running:
        raise JobNotRunning(f"job {job_id} is {job.status}")
    participant.status = RoundParticipantStatus.finished
    participant.example_count = report.example_count
    participant.eval_metrics = report.eval_metrics
    participant.finished_at = now
    session.flush()
    record(
        session,
        actor,
        "round.client_done",
        "job",
        job_id,
        {"round": number, "examples": report.example_count},
    )
    if all(p.status != RoundParticipantStatus.active for p in rounds.participants(round_.id)):
        _close_and_advance(session, job, round_, now, "all participants finished")
    return _round_done_response(session, job_id, number)


def report_client_failure(
    session: Session, client_id: int, actor: str, job_id: int, reason: str, now: datetime
) -> AgentFailureResponse:
    """A participant's agent cannot go on with a running (or paused) job: under `straggler_policy: fail`
    the job fails with the reason; under `drop` the client leaves the job (its open round, and no later
    round takes it) and the job goes on while `min_clients` remain. A repeated report answers the state."""
    job_for_client(session, job_id, client_id, approved=True)
    job = get_job(session, job_id, for_update=True)
    participant = ParticipantRepository(session).get(job_id, client_id)
    assert participant is not None
    if participant.failure_reason is None:
        if job.status not in (JobStatus.running, JobStatus.paused):
            raise JobNotRunning(f"job {job_id} is {job.status}; failures are reported while it runs")
        participant.failure_reason = reason
        session.flush()
        record(
            session, actor, "job.client_failure", "job", job_id, {"client_id": client_id, "reason": reason}
        )
        client = ClientRepository(session).get(client_id)
        why = f"client {client.name if client else client_id} reported a fatal error: {reason}"
        if job.straggler_policy == StragglerPolicy.fail:
            rounds = RoundRepository(session)
            open_round = rounds.open_round(job_id)
            if open_round is not None:
                rounds.set_status_if_open(open_round.id, RoundStatus.failed, closed_at=now, close_reason=why)
            _fail_job(session, job, why, now)
        else:
            drop_client_from_open_rounds(session, client_id, f"reported a fatal error: {reason}", now, job_id)
    status = JobStatus(get_job(session, job_id).status)
    going_on = status in (JobStatus.running, JobStatus.paused, JobStatus.completed)
    return AgentFailureResponse(
        job_id=job_id, job_status=status, outcome="client_dropped" if going_on else "job_failed"
    )


# --- round mechanics ------------------------------------------------------------------------------


def _get_round(session: Session, job_id: int, number: int, *, for_update: bool = False) -> Round:
    round_ = RoundRepository(session).get(job_id, number, for_update=for_update)
    if round_ is None:
        raise RoundNotFound(f"round {number} of job {job_id} not found")
    return round_


def _open_round(session: Session, job: Job, number: int, client_ids: list[int], now: datetime) -> None:
    if len(client_ids) < job.min_clients:
        _fail_job(
            session,
            job,
            f"round {number}: {len(client_ids)} clients online, min_clients={job.min_clients}",
            now,
        )
        return
    deadline = now + timedelta(seconds=job.round_timeout_s)
    round_ = Round(
        job_id=job.id, number=number, status=RoundStatus.open, started_at=now, deadline_at=deadline
    )
    RoundRepository(session).add(round_, client_ids)
    job.current_round = number
    session.flush()
    record(session, SYSTEM, "round.open", "job", job.id, {"round": number, "clients": client_ids})


def _apply_round_policy(session: Session, job: Job, round_: Round, now: datetime, reason: str) -> bool:
    """Drop unfinished participants when ≥ min_clients finished and the policy allows, else fail the job.

    Returns False when another transaction closed the round first.
    """
    rounds = RoundRepository(session)
    participants = rounds.participants(round_.id)
    finished = [p for p in participants if p.status == RoundParticipantStatus.finished]
    if job.straggler_policy == StragglerPolicy.drop and len(finished) >= job.min_clients:
        stragglers = [p for p in participants if p.status == RoundParticipantStatus.active]
        if not _close_and_advance(
            session, job, round_, now, f"{reason}; dropped {len(stragglers)} stragglers"
        ):
            return False
        _drop(session, job.id, stragglers, reason)
        return True
    why = f"{reason}; {len(finished)} finished, min_clients={job.min_clients}, policy={job.straggler_policy}"
    if not rounds.set_status_if_open(round_.id, RoundStatus.failed, closed_at=now, close_reason=why):
        return False
    _fail_job(session, job, f"round {round_.number}: {why}", now)
    return True


def _drop(session: Session, job_id: int, participants: list[RoundParticipant], reason: str) -> None:
    for participant in participants:
        participant.status = RoundParticipantStatus.dropped
        participant.drop_reason = reason
        note_dropped(session, job_id, participant.client_id)


def _close_and_advance(session: Session, job: Job, round_: Round, now: datetime, reason: str) -> bool:
    """Close the round (exactly one caller wins), then open the next one or complete the job."""
    if not RoundRepository(session).set_status_if_open(
        round_.id, RoundStatus.closed, closed_at=now, close_reason=reason
    ):
        return False
    record(session, SYSTEM, "round.close", "job", job.id, {"round": round_.number, "reason": reason})
    if round_.number >= job.rounds:
        if JobRepository(session).set_status_if(
            job.id, TRANSITIONS["complete"][0], JobStatus.completed, updated_at=now
        ):
            record(session, SYSTEM, "job.complete", "job", job.id, {"from": job.status, "to": "completed"})
        return True
    client_ids = ParticipantRepository(session).approved_active_client_ids(job.id)
    _open_round(session, job, round_.number + 1, client_ids, now)
    return True


def _fail_job(session: Session, job: Job, reason: str, now: datetime) -> None:
    if JobRepository(session).set_status_if(
        job.id, TRANSITIONS["fail"][0], JobStatus.failed, failure_reason=reason, updated_at=now
    ):
        record(
            session, SYSTEM, "job.fail", "job", job.id, {"from": job.status, "to": "failed", "reason": reason}
        )


def _round_done_response(session: Session, job_id: int, number: int) -> RoundDoneResponse:
    job = get_job(session, job_id)
    round_ = _get_round(session, job_id, number)
    return RoundDoneResponse(
        job_id=job_id,
        round_number=number,
        round_status=RoundStatus(round_.status),
        job_status=JobStatus(job.status),
    )


def _invitation_view(session: Session, job: Job, participant: JobParticipant) -> InvitationView:
    """With the figure of the newest completed privacy audit of the job's current settings (else None)."""
    token_recovery, attack = audited_figure(session, job)
    return InvitationView(
        job_id=job.id,
        name=job.name,
        model_ref=job.model_ref,
        task_type=job.task_type,  # type: ignore[arg-type]
        parallel_mode=job.parallel_mode,  # type: ignore[arg-type]
        rounds=job.rounds,
        steps_per_round=job.steps_per_round,
        hyperparameters=job.hyperparameters,
        privacy=job.privacy,
        split_plan=job.split_plan,
        job_status=JobStatus(job.status),
        consent=ConsentStatus(participant.consent),
        audited_token_recovery=token_recovery,
        audited_attack=attack,
    )


def _agent_job_view(
    session: Session, job: Job, participant: JobParticipant, deployment_public_key: str
) -> AgentJobView:
    """The job's own server public key; jobs opened before per-job keys existed use the deployment's."""
    return AgentJobView(
        **_invitation_view(session, job, participant).model_dump(),
        adapter=job.adapter,
        current_round=job.current_round,
        server_public_key=job.server_public_key or deployment_public_key,
    )
