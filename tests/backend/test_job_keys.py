"""Per-job server key pairs: one per job, 0600 in a 0700 dir, matching the row, deleted after retention."""

from __future__ import annotations

import stat
from datetime import timedelta

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from backend.housekeeping import run_housekeeping
from backend.jobs import service
from backend.models import Job, utc_now
from backend.server_keys import job_key_path, public_key_b64
from backend.settings import Settings
from backend.steps.service import read_spec
from flglm.protocol import AGENT_JOB_PATH, JobSpec
from flglm.step_protocol import STEP_MESSAGE_PATH
from flglm.wire.keys import load_private_key
from tests.support.control_plane import Agent, Api, enroll, job_spec, running_job

RETENTION_S = 3600.0


def _agent_key(agent: Agent, job_id: int) -> str:
    key: str = agent.api.ok("GET", AGENT_JOB_PATH.format(job_id=job_id))["server_public_key"]
    return key


def _file_public_key(settings: Settings, job_id: int) -> str:
    return public_key_b64(load_private_key(job_key_path(settings.job_keys_dir(), job_id)))


def _audit_actions(api: Api, job_id: int) -> list[str]:
    items = api.ok("GET", "/audit", params={"limit": 200})["items"]
    return [e["action"] for e in items if e["object_type"] == "job" and e["object_id"] == str(job_id)]


def test_every_job_of_a_client_gets_its_own_key_pair_0600_in_a_0700_dir(
    api: Api, app: FastAPI, settings: Settings
) -> None:
    agent = enroll(api, "k-agent")
    first = running_job(api, [agent])
    second = api.ok("POST", "/jobs", 201, json=job_spec(["k-agent"]))["id"]
    assert not job_key_path(settings.job_keys_dir(), second).exists()  # a draft has no key yet
    api.ok("POST", f"/jobs/{second}/open")

    keys = {_agent_key(agent, first), _agent_key(agent, second), app.state.server_public_key_b64}
    assert len(keys) == 3  # two jobs, two keys, neither the deployment key
    for job_id in (first, second):
        path = job_key_path(settings.job_keys_dir(), job_id)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert _file_public_key(settings, job_id) == _agent_key(agent, job_id)
        assert "job.server_key_created" in _audit_actions(api, job_id)
    assert stat.S_IMODE(settings.job_keys_dir().stat().st_mode) == 0o700
    work = agent.api.ok("GET", "/agent/work")["assignments"]
    assert [a["job"]["server_public_key"] for a in work] == [_agent_key(agent, first)]
    spec = read_spec(app.state.step_relay, first)
    assert spec.server_key_file == str(job_key_path(settings.job_keys_dir(), first))


def _draft(factory: sessionmaker[Session], clients: list[str]) -> int:
    with factory() as session, session.begin():
        return service.create_job(session, "admin", JobSpec(**job_spec(clients)), utc_now()).id


def test_a_rolled_back_open_leaves_no_usable_key(api: Api, app: FastAPI, settings: Settings) -> None:
    factory: sessionmaker[Session] = app.state.session_factory
    agent = enroll(api, "rb-agent")
    job_id = _draft(factory, ["rb-agent"])
    with factory() as session:
        session.begin()
        service.transition(session, "admin", job_id, "open", utc_now(), settings.job_keys_dir())
        orphan = _file_public_key(settings, job_id)
        session.rollback()  # e.g. the commit failed after the key file was written
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "draft"
    with factory() as session:
        assert session.get(Job, job_id).server_public_key is None  # type: ignore[union-attr]
    api.ok("POST", f"/jobs/{job_id}/open")  # the next open replaces the orphan
    published = _agent_key(agent, job_id)
    assert published == _file_public_key(settings, job_id) != orphan


def test_a_job_opened_without_a_key_keeps_the_deployment_key(
    api: Api, app: FastAPI, settings: Settings
) -> None:
    """Jobs opened before per-job keys existed (NULL column) go on with the deployment key everywhere."""
    factory: sessionmaker[Session] = app.state.session_factory
    agent = enroll(api, "old-agent")
    job_id = _draft(factory, ["old-agent"])
    with factory() as session, session.begin():
        service.transition(session, "admin", job_id, "open", utc_now())
    assert _agent_key(agent, job_id) == app.state.server_public_key_b64
    agent.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    api.ok("POST", f"/jobs/{job_id}/start")
    assert read_spec(app.state.step_relay, job_id).server_key_file is None
    assert not job_key_path(settings.job_keys_dir(), job_id).exists()


def _eval_upload_path(job_id: int) -> str:
    return STEP_MESSAGE_PATH.format(
        job_id=job_id, round_number=1, step=0, direction="eval_activations", sequence=1
    )


def test_retention_deletes_the_ended_jobs_key_audits_it_and_later_uploads_get_410(
    api: Api, app: FastAPI, settings: Settings
) -> None:
    factory: sessionmaker[Session] = app.state.session_factory
    agent = enroll(api, "ret-agent")
    ended = running_job(api, [agent])
    still_running = running_job(api, [agent], round_timeout_s=10 * RETENTION_S)
    api.ok("POST", f"/jobs/{ended}/cancel")
    keys_dir = settings.job_keys_dir()

    def housekeeping(after_s: float) -> list[int]:
        now = utc_now() + timedelta(seconds=after_s)
        return run_housekeeping(factory, now, 10 * after_s + 60, keys_dir, RETENTION_S).job_keys_deleted

    assert housekeeping(RETENTION_S - 60) == []  # the agents' final evaluation still needs it
    assert job_key_path(keys_dir, ended).exists()
    assert housekeeping(RETENTION_S + 60) == [ended]
    assert not job_key_path(keys_dir, ended).exists()
    assert job_key_path(keys_dir, still_running).exists()  # a running job keeps its key
    assert housekeeping(RETENTION_S + 120) == []  # done once
    assert _audit_actions(api, ended).count("job.server_key_deleted") == 1
    shown = api.ok("GET", f"/jobs/{ended}")
    assert shown["server_key_deleted_at"] is not None and shown["server_public_key"] == _agent_key(
        agent, ended
    )
    assert api.ok("GET", f"/jobs/{still_running}")["server_key_deleted_at"] is None

    response = agent.api.request(
        "PUT",
        _eval_upload_path(ended),
        content=b"sealed",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 410, response.text
    assert response.json()["error"]["code"] == "job_key_deleted"
    assert "deleted" in response.json()["error"]["message"]
    assert _agent_key(agent, ended)  # the job view still answers
