"""A job's end reaches the after-commit callback (which releases its worker replicas) only once committed;
the embedded executor answers a release without loading the engine when no step ever ran."""

from __future__ import annotations

from fastapi import FastAPI

from backend.db import create_db_engine, create_session_factory
from backend.jobs import service
from backend.jobs.after_commit import on_jobs_finished
from backend.models import utc_now
from backend.settings import Settings
from flglm.contracts.tasks import RELEASE_JOB
from flglm.protocol import JobSpec, JobStatus
from flglm.step_protocol import replica_queue, spec_blob_key
from tests.support.control_plane import Api, enroll, job_spec, running_job


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


def test_a_job_that_ends_before_any_step_loads_no_replica_to_release_it(api: Api, app: FastAPI) -> None:
    job_id = running_job(api, [enroll(api, "owner")])
    runtime = app.state.step_relay
    assert runtime.store.get(spec_blob_key(job_id)) is not None  # the workers know the job: it is released
    assert api.ok("POST", f"/jobs/{job_id}/cancel")["status"] == "cancelled"
    release = runtime.dispatcher.submit(RELEASE_JOB, {"job_id": job_id, "replica": 0}, replica_queue(0))
    assert release.get(timeout_s=30) == {"status": "released", "dropped": []}  # nothing was loaded for it
    assert runtime.dispatcher.runtime.replicas == {}
