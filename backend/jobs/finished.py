"""Jobs that a transaction moved to a terminal state, handed to a callback once it commits (not on rollback).

Every status change goes through `JobRepository.set_status_if`, which notes a terminal winner in the
session's `info`; the session factory's `after_commit` hook hands the noted ids to the callback (the
backend releases the jobs' server replicas on the workers), its `after_rollback` hook forgets them. So the
workers only hear of an end that is durable, whichever path ended the job (the last round-done report, an
operator's cancel or round close, the deadline or offline-client housekeeping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_FINISHED_JOB_IDS = "flglm.finished_job_ids"


def note_finished(session: Session, job_id: int) -> None:
    """This transaction moved job `job_id` to a terminal state."""
    session.info.setdefault(_FINISHED_JOB_IDS, set()).add(job_id)


def on_jobs_finished(session_factory: sessionmaker[Session], callback: Callable[[list[int]], None]) -> None:
    """Call `callback(job ids)` after each commit of a session from `session_factory` that finished jobs.

    The callback runs after the commit, so its failure cannot undo anything: it is logged, and the
    workers' idle TTL frees what it did not.
    """

    def after_commit(session: Session) -> None:
        job_ids = session.info.pop(_FINISHED_JOB_IDS, None)
        if not job_ids:
            return
        try:
            callback(sorted(job_ids))
        except Exception:
            log.exception("jobs %s finished, but their after-commit work failed", sorted(job_ids))

    def after_rollback(session: Session) -> None:
        session.info.pop(_FINISHED_JOB_IDS, None)

    event.listen(session_factory, "after_commit", after_commit)
    event.listen(session_factory, "after_rollback", after_rollback)
