"""Privacy audits of a job's settings: start one as a task, follow its records into its row, list them.

The audit runs as the `flglm.privacy_audit` task (in this process or on a Celery worker's `flglm.privacy`
queue); the task writes its progress (with a heartbeat) and outcome to the blob store under the audit's
random `task_key` (`flglm.contracts.privacy_records`). `sync_audit` copies them into the row: on every
read of the audits, on a start, and in housekeeping. So a control plane that restarts mid-audit loses
nothing that a Celery worker computes; the in-process executor's audits die with the process, and
`fail_orphaned_audits` marks them failed at start-up. An audit whose task stopped beating, or that no
worker picked up in time, becomes failed with a message that says so.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

import redis
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.audit.service import record
from backend.errors import Conflict, InvalidInput, NotFound, Unavailable
from backend.jobs.service import get_job
from backend.models import PrivacyAuditRun
from backend.privacy.matching import job_audit_request, job_settings_key, settings_key
from backend.privacy.repository import PrivacyAuditRepository
from backend.privacy.schemas import (
    AuditProgressView,
    AuditStartRequest,
    AuditStatus,
    PrivacyAuditView,
)
from backend.steps.relay import TaskDispatcher
from flglm.contracts.blob_store import BlobStore
from flglm.contracts.privacy_records import HEARTBEAT_TTL_S, AuditRecords
from flglm.contracts.tasks import PRIVACY_AUDIT, PRIVACY_QUEUE
from flglm.privacy.report import AuditRequest, PrivacyAudit

log = logging.getLogger(__name__)

RESTARTED = (
    "the control plane restarted while this audit was {status} in its own process (FLGLM_EXECUTOR="
    "inprocess), which ended it; start it again"
)
LOST = (
    "the worker running this audit stopped without finishing it (no heartbeat for {ttl:.0f} s: it was "
    "killed or restarted); start it again"
)
NOT_PICKED_UP = (
    "no worker started this audit within {timeout:.0f} s (FLGLM_PRIVACY_AUDIT_QUEUE_TIMEOUT_S): is a "
    "`flglm worker` consuming the flglm.privacy queue (on by default, --no-privacy-queue turns it off)?"
)


class PrivacyAuditNotFound(NotFound):
    code = "privacy_audit_not_found"


class PrivacyAuditRunning(Conflict):
    code = "privacy_audit_running"


class JobNotAuditable(InvalidInput):
    code = "job_not_auditable"


class AuditQueueUnavailable(Unavailable):
    code = "task_queue_unavailable"


def start_audit(
    session: Session,
    actor: str,
    job_id: int,
    choices: AuditStartRequest,
    now: datetime,
    dispatcher: TaskDispatcher,
    store: BlobStore,
    queue_timeout_s: float,
) -> PrivacyAuditRun:
    """Queue an audit of the job's current settings; 409 while another audit of the job is queued or running.

    The row is inserted and the task queued in the request's transaction: if queuing fails, the row is
    rolled back with it (no audit that nothing runs); a task whose row then fails to commit only writes
    records under a random key that nothing reads.
    """
    job = get_job(session, job_id, for_update=True)
    for active in PrivacyAuditRepository(session).active_for_job(job.id):
        sync_audit(session, active, store, now, queue_timeout_s)  # it may have ended meanwhile
    _refuse_if_active(session, job.id)
    try:
        request = job_audit_request(job, choices.model_dump(exclude_none=True))
    except ValidationError as exc:
        raise JobNotAuditable(f"job {job.id}'s settings cannot be audited: {_errors(exc)}") from None
    audit = PrivacyAuditRun(
        job_id=job.id,
        status=AuditStatus.queued.value,
        task_key=uuid.uuid4().hex,
        request=request.model_dump(mode="json"),
        settings_key=settings_key(request),
        created_by=actor,
        created_at=now,
    )
    try:
        PrivacyAuditRepository(session).add(audit)
    except IntegrityError:  # the partial unique index: a concurrent start committed its audit first
        raise PrivacyAuditRunning(
            f"another privacy audit of job {job.id} was started at the same moment: one audit per job runs "
            "at a time; wait for it to complete or fail"
        ) from None
    record(
        session,
        actor,
        "privacy_audit.start",
        "job",
        job.id,
        {
            "audit_id": audit.id,
            "settings_key": audit.settings_key,
            "sequences": request.sequences,
            "seq_len": request.seq_len,
            "text_source": f"{len(request.texts)} texts given" if request.texts else request.corpus,
            "attacks": list(request.attacks),
            "seed": request.seed,
        },
    )
    kwargs = {"task_key": audit.task_key, "request": audit.request}
    try:
        dispatcher.submit(PRIVACY_AUDIT, kwargs, PRIVACY_QUEUE)
    except Exception as exc:  # the broker is down or refused: nothing was started, the row rolls back
        log.exception("queuing privacy audit of job %s failed", job.id)
        raise AuditQueueUnavailable(f"the audit could not be queued ({type(exc).__name__}: {exc})") from None
    return audit


def _refuse_if_active(session: Session, job_id: int) -> None:
    active = PrivacyAuditRepository(session).active_for_job(job_id)
    if active:
        raise PrivacyAuditRunning(
            f"privacy audit {active[0].id} of job {job_id} is {active[0].status}: one audit per job runs "
            "at a time; wait for it to complete or fail"
        )


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
    )


def sync_audit(
    session: Session, audit: PrivacyAuditRun, store: BlobStore, now: datetime, queue_timeout_s: float
) -> None:
    """Copy the task's records into an active audit's row (outcome, else progress), or fail it when its task
    is gone. The order of the reads matters: see `flglm.contracts.privacy_records`."""
    if audit.status not in (AuditStatus.queued, AuditStatus.running):
        return
    records = AuditRecords(store, audit.task_key)
    try:
        outcome = records.outcome()
        progress = None if outcome is not None else records.progress()
        started = outcome is not None or progress is not None or records.started()
    except redis.RedisError as exc:  # keep showing what the row says; the next read tries again
        log.warning("cannot read privacy audit %s's records: %s", audit.id, exc)
        return
    repository = PrivacyAuditRepository(session)
    started_at = audit.started_at or now
    if outcome is not None:
        values: dict[str, Any] = {"status": outcome.status, "finished_at": now, "started_at": started_at}
        if outcome.status == "completed":
            values["result"] = outcome.result
        else:
            values["error"] = outcome.error or "the audit failed without a message"
        repository.update_if_active(audit.id, **values)
    elif progress is not None:
        repository.update_if_active(
            audit.id,
            status=AuditStatus.running.value,
            started_at=started_at,
            progress_stage=progress.stage,
            progress_done=progress.done,
            progress_total=progress.total,
        )
    elif started or audit.status == AuditStatus.running:
        _fail(repository, audit, LOST.format(ttl=HEARTBEAT_TTL_S), now)
    elif now - audit.created_at > timedelta(seconds=queue_timeout_s):
        _fail(repository, audit, NOT_PICKED_UP.format(timeout=queue_timeout_s), now)


def _fail(repository: PrivacyAuditRepository, audit: PrivacyAuditRun, message: str, now: datetime) -> None:
    repository.update_if_active(audit.id, status=AuditStatus.failed.value, error=message, finished_at=now)


def sync_active_audits(
    session: Session, store: BlobStore, now: datetime, queue_timeout_s: float
) -> list[int]:
    """Housekeeping: sync every queued or running audit; returns their ids."""
    audits = PrivacyAuditRepository(session).active()
    for audit in audits:
        sync_audit(session, audit, store, now, queue_timeout_s)
    return [audit.id for audit in audits]


def fail_orphaned_audits(session: Session, now: datetime) -> list[int]:
    """At the start of an in-process control plane: its audits ran in the previous process, now gone."""
    repository = PrivacyAuditRepository(session)
    failed = []
    for audit in repository.active():
        if repository.update_if_active(
            audit.id,
            status=AuditStatus.failed.value,
            error=RESTARTED.format(status=audit.status),
            finished_at=now,
        ):
            failed.append(audit.id)
    return failed


def list_audits(
    session: Session,
    job_id: int,
    store: BlobStore,
    now: datetime,
    queue_timeout_s: float,
    *,
    limit: int,
    offset: int,
) -> tuple[list[PrivacyAuditView], int]:
    """The job's audits, newest first, with the active ones synced first."""
    job = get_job(session, job_id)
    repository = PrivacyAuditRepository(session)
    for audit in repository.active_for_job(job.id):
        sync_audit(session, audit, store, now, queue_timeout_s)
    rows, total = repository.page_for_job(job.id, limit=limit, offset=offset)
    current = job_settings_key(job)
    return [audit_view(row, current) for row in rows], total


def show_audit(
    session: Session, job_id: int, audit_id: int, store: BlobStore, now: datetime, queue_timeout_s: float
) -> PrivacyAuditView:
    job = get_job(session, job_id)
    repository = PrivacyAuditRepository(session)
    audit = repository.get(job.id, audit_id)
    if audit is None:
        raise PrivacyAuditNotFound(f"privacy audit {audit_id} of job {job_id} not found")
    sync_audit(session, audit, store, now, queue_timeout_s)
    audit = repository.get(job.id, audit_id)
    assert audit is not None
    return audit_view(audit, job_settings_key(job))


def audit_view(audit: PrivacyAuditRun, current_settings_key: str | None) -> PrivacyAuditView:
    """The row as the API shows it; the admin's own texts are counted, not echoed. A row written by another
    version of the report models is shown as stored (request) or with its report left out, saying why."""
    try:
        request = AuditRequest.model_validate(audit.request)
    except ValidationError:
        request = AuditRequest.model_construct(**audit.request)
    result, error = None, audit.error
    if audit.result is not None:
        try:
            result = PrivacyAudit.model_validate(audit.result)
        except ValidationError as exc:
            error = f"the stored report does not match this version's report format: {_errors(exc)}"
    if result is not None:
        result = result.model_copy(update={"request": result.request.model_copy(update={"texts": None})})
    running = audit.status == AuditStatus.running and audit.progress_stage is not None
    return PrivacyAuditView(
        id=audit.id,
        job_id=audit.job_id,
        status=AuditStatus(audit.status),
        created_by=audit.created_by,
        created_at=audit.created_at,
        started_at=audit.started_at,
        finished_at=audit.finished_at,
        request=request.model_copy(update={"texts": None}),
        own_texts=len(request.texts or []),
        matches_job_settings=audit.settings_key == current_settings_key,
        progress=(
            AuditProgressView(
                stage=audit.progress_stage or "",
                done=audit.progress_done or 0,
                total=audit.progress_total or 0,
            )
            if running
            else None
        ),
        result=result,
        error=error,
    )
