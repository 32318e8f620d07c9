"""What a transaction did that workers must hear of, handed to a callback once it commits (not on rollback).

Three kinds of notes: jobs whose agents' work may have changed (`note_work_changed`: the agents' work
long-polls wake), jobs moved to a terminal state (every status change goes through
`JobRepository.set_status_if`, which notes a terminal winner), and clients dropped from an open round
(`backend.jobs.service.drop_client_from_open_rounds`). The session factory's `after_commit` hook hands the
noted items to the callbacks (the backend releases the jobs' server replicas, and tells the replicas to stop
waiting for a dropped client's gradients), its `after_rollback` hook forgets them. So the workers only hear
of what is durable, whichever path did it (the last round-done report, an operator's cancel or round close,
the deadline or offline-client housekeeping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_FINISHED_JOB_IDS = "flglm.finished_job_ids"
_DROPPED_CLIENTS = "flglm.dropped_clients"
_WORK_CHANGED_JOB_IDS = "flglm.work_changed_job_ids"


def note_finished(session: Session, job_id: int) -> None:
    """This transaction moved job `job_id` to a terminal state."""
    session.info.setdefault(_FINISHED_JOB_IDS, set()).add(job_id)


def note_dropped(session: Session, job_id: int, client_id: int) -> None:
    """This transaction dropped client `client_id` from the open round of job `job_id`."""
    session.info.setdefault(_DROPPED_CLIENTS, set()).add((job_id, client_id))
    note_work_changed(session, job_id)


def note_work_changed(session: Session, job_id: int) -> None:
    """This transaction may have changed what job `job_id`'s agents are to do (its status, its open round,
    who is in it): their work long-polls wake once it commits."""
    session.info.setdefault(_WORK_CHANGED_JOB_IDS, set()).add(job_id)


def on_jobs_finished(session_factory: sessionmaker[Session], callback: Callable[[list[int]], None]) -> None:
    """Call `callback(job ids)` after each commit of a session from `session_factory` that finished jobs.

    The callback runs after the commit, so its failure cannot undo anything: it is logged, and the
    workers' idle TTL frees what it did not.
    """
    _after_commit(session_factory, _FINISHED_JOB_IDS, callback)


def on_clients_dropped(
    session_factory: sessionmaker[Session], callback: Callable[[list[tuple[int, int]]], None]
) -> None:
    """Call `callback([(job id, client id), ...])` after each commit that dropped clients from rounds (a
    failure is logged: the replica's `inflight_timeout_s` frees what it did not)."""
    _after_commit(session_factory, _DROPPED_CLIENTS, callback)


def on_work_changed(session_factory: sessionmaker[Session], callback: Callable[[list[int]], None]) -> None:
    """Call `callback(job ids)` after each commit that noted jobs whose agents' work may have changed."""
    _after_commit(session_factory, _WORK_CHANGED_JOB_IDS, callback)


def _after_commit(session_factory: sessionmaker[Session], key: str, callback: Callable[[Any], None]) -> None:
    def after_commit(session: Session) -> None:
        items: set[Hashable] | None = session.info.pop(key, None)
        if not items:
            return
        try:
            callback(sorted(items))  # type: ignore[type-var]
        except Exception:
            log.exception("%s %s committed, but their after-commit work failed", key, sorted(items))  # type: ignore[type-var]

    def after_rollback(session: Session) -> None:
        session.info.pop(key, None)

    event.listen(session_factory, "after_commit", after_commit)
    event.listen(session_factory, "after_rollback", after_rollback)
