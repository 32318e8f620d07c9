"""Periodic control-plane duties: heartbeat leases, round deadlines, expired job keys (one transaction), then
the `auto` jobs whose clients are ready are started, the privacy audits' progress and the specs of started
jobs not yet published (transactions of their own: a blob store that is down must not undo the rest)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from backend.clients.service import mark_silent_clients_offline
from backend.jobs.auto_start import start_ready_jobs
from backend.jobs.service import delete_expired_job_keys, enforce_round_deadlines
from backend.privacy.service import sync_active_audits
from flglm.contracts.blob_store import BlobStore


@dataclass(frozen=True)
class HousekeepingReport:
    clients_marked_offline: list[int]
    rounds_closed_by_deadline: list[tuple[int, int]]
    job_keys_deleted: list[int]
    privacy_audits_synced: list[int]
    specs_published: list[int]
    jobs_started: list[int]


def run_housekeeping(
    session_factory: sessionmaker[Session],
    now: datetime,
    lease_s: float,
    job_keys_dir: Path | None = None,
    job_key_retention_s: float = 86400.0,
    audit_store: BlobStore | None = None,
    audit_queue_timeout_s: float = 6 * 3600.0,
    publish_specs: Callable[[Session], list[int]] | None = None,
) -> HousekeepingReport:
    """One pass; `job_keys_dir` None skips the job keys (lifecycle tests that hold none), `audit_store` None
    the privacy audits, `publish_specs` None the worker specs of started jobs whose publication failed."""
    with session_factory() as session, session.begin():
        offline = mark_silent_clients_offline(session, now, lease_s)
        overdue = enforce_round_deadlines(session, now)
        deleted = (
            []
            if job_keys_dir is None
            else delete_expired_job_keys(session, now, job_key_retention_s, job_keys_dir)
        )
    with session_factory() as session, session.begin():
        started = start_ready_jobs(session, now)  # their specs are published below, in this pass
    synced = []
    if audit_store is not None:
        with session_factory() as session, session.begin():
            synced = sync_active_audits(session, audit_store, now, audit_queue_timeout_s)
    published = []
    if publish_specs is not None:
        with session_factory() as session, session.begin():
            published = publish_specs(session)
    return HousekeepingReport(
        clients_marked_offline=offline,
        rounds_closed_by_deadline=overdue,
        job_keys_deleted=deleted,
        privacy_audits_synced=synced,
        specs_published=published,
        jobs_started=started,
    )
