"""Jobs that start by themselves (`start: auto`) once `min_clients` approved clients are online, and the line
that says what a waiting job waits for (`GET /jobs/{id}`'s `waiting_for`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from backend.jobs.repository import JobRepository, ParticipantRepository
from backend.jobs.service import SYSTEM, IllegalTransition, NotEnoughParticipants, get_job, transition
from backend.models import Job
from flglm.protocol import ClientStatus, ConsentStatus, JobStatus, StartMode


def start_ready_jobs(session: Session, now: datetime) -> list[int]:
    """Start every `auto` job waiting for clients that has `min_clients` approved, online clients; returns
    their ids. The operator's start path (`transition`): the job row is locked and the state change is a
    conditional UPDATE, so of an operator's start and this one exactly one wins (the loser is skipped here,
    before anything was written for that job)."""
    started = []
    for candidate in JobRepository(session).with_status([JobStatus.waiting_for_clients]):
        participants = ParticipantRepository(session)
        if candidate.start != StartMode.auto:
            continue
        if len(participants.approved_active_client_ids(candidate.id)) < candidate.min_clients:
            continue  # not ready: no row lock taken
        job = get_job(session, candidate.id, for_update=True)
        if job.status != JobStatus.waiting_for_clients or job.start != StartMode.auto:
            continue
        try:
            transition(session, SYSTEM, job.id, "start", now)
        except (IllegalTransition, NotEnoughParticipants):
            continue  # started by the operator, or a client went away meanwhile: the next pass looks again
        started.append(job.id)
    return started


def waiting_for(session: Session, job: Job) -> str | None:
    """What keeps a draft or waiting job from running, in one line; None for any other state."""
    if job.status == JobStatus.draft:
        return f"being opened to its invited clients (`flglm job open {job.id}`)"
    if job.status != JobStatus.waiting_for_clients:
        return None
    rows = ParticipantRepository(session).list_for_job(job.id)
    approved = [c.name for p, c in rows if p.consent == ConsentStatus.approved]
    offline = [
        c.name for p, c in rows if p.consent == ConsentStatus.approved and c.status != ClientStatus.active
    ]
    undecided = [c.name for p, c in rows if p.consent == ConsentStatus.invited]
    ready = len(approved) - len(offline)
    parts = [f"{ready} of {job.min_clients} approved, online clients (min_clients)"]
    parts.append(f"approved: {', '.join(approved) or 'none'}")
    if offline:
        parts.append(f"offline: {', '.join(offline)}")
    if undecided:
        parts.append(f"not yet decided: {', '.join(undecided)}")
    clients = "; ".join(parts)
    if job.start == StartMode.manual:
        return f"a manual start (`flglm job start {job.id}`); {clients}"
    if ready >= job.min_clients:
        return f"the next housekeeping pass, which starts it (within seconds); {clients}"
    return clients
