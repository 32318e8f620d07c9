"""A job's end reaches the after-commit callback (which releases its worker replicas) only once committed."""

from __future__ import annotations

from backend.db import create_db_engine, create_session_factory
from backend.jobs import service
from backend.jobs.finished import on_jobs_finished
from backend.models import utc_now
from backend.settings import Settings
from flglm.protocol import JobSpec, JobStatus
from tests.backend.conftest import job_spec


def test_only_committed_job_ends_reach_the_callback(settings: Settings) -> None:
    engine = create_db_engine(settings.resolved_database_url())
    session_factory = create_session_factory(engine)
    finished: list[list[int]] = []
    on_jobs_finished(session_factory, finished.append)
    with session_factory() as session, session.begin():
        kept, undone, running = (
            service.create_job(session, "admin", JobSpec(**job_spec([], name=name)), utc_now()).id
            for name in ("kept", "undone", "running")
        )
        service.transition(session, "admin", running, "open", utc_now())
    assert finished == []  # no job ended

    with session_factory() as session:  # as `get_session` runs a request: autobegin, commit or roll back
        service.transition(session, "admin", undone, "cancel", utc_now())
        session.rollback()  # the request failed after the cancel: nothing happened
        service.transition(session, "admin", kept, "cancel", utc_now())
        session.commit()
    assert finished == [[kept]]  # the rolled-back end was forgotten, not reported with the next commit
    with session_factory() as session:
        assert service.get_job(session, undone).status == JobStatus.draft
        assert service.get_job(session, running).status == JobStatus.waiting_for_clients
    engine.dispose()
