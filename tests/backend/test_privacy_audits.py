"""Privacy audits over the API: roles, bounded bodies, one audit per job, a real tiny-model audit through the
in-process executor, its figure in the data owners' invitations, and the audits whose task is gone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from apps.server import create_server_app
from backend.housekeeping import run_housekeeping
from backend.models import Job, PrivacyAuditRun, utc_now
from backend.privacy.matching import job_audit_request, settings_key
from backend.privacy.service import LOST, NOT_PICKED_UP, RESTARTED
from backend.settings import Settings
from flglm.contracts.blob_store import RedisBlobStore
from flglm.contracts.privacy_records import HEARTBEAT_TTL_S, AuditProgress, AuditRecords
from flglm.contracts.tasks import PRIVACY_QUEUE
from tests.support.control_plane import Agent, Api, enroll, job_spec

TEXTS = [
    "The river rose overnight and the town council met at dawn to plan the evacuation of the low streets.",
    "A small bakery on the corner sells rye bread, honey cakes and strong coffee to the early commuters.",
    "Researchers measured the glacier's retreat with drones and found it had lost forty metres in a year.",
]
# A tiny audit: 4 sequences of 8 tokens from the texts above (a few seconds on one CPU core).
SMALL = {"sequences": 4, "seq_len": 8, "texts": TEXTS}
# Where only the bookkeeping matters: the quickest attack.
QUICK = {**SMALL, "attacks": ["known_weights_inversion"]}
AUDIT_TIMEOUT_S = 240.0


def tiny_job(api: Api, clients: list[str], **overrides: Any) -> int:
    spec = job_spec(clients, model_ref="tiny:llama", task_type="generation", **overrides)
    job_id: int = api.ok("POST", "/jobs", 201, json=spec)["id"]
    return job_id


def wait_for_end(api: Api, job_id: int, audit_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + AUDIT_TIMEOUT_S
    while True:
        audit: dict[str, Any] = api.ok("GET", f"/jobs/{job_id}/privacy-audits/{audit_id}")
        if audit["status"] in ("completed", "failed"):
            return audit
        assert time.monotonic() < deadline, f"audit did not end in {AUDIT_TIMEOUT_S} s: {audit}"
        time.sleep(0.5)


def error_of(response: Any) -> tuple[int, str, str]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["message"]


# --- a real audit, in this process ----------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_audit_completes_and_its_figure_reaches_the_invitation_while_settings_match(
    api: Api, app: FastAPI
) -> None:
    agent = enroll(api, "owner-a")
    job_id = tiny_job(api, ["owner-a"])
    api.ok("POST", f"/jobs/{job_id}/open")
    invitation = _invitation(agent, job_id)
    assert invitation["audited_token_recovery"] is None and invitation["audited_attack"] is None

    started = api.ok("POST", f"/jobs/{job_id}/privacy-audits", 202, json=SMALL)
    assert started["status"] == "queued" and started["job_id"] == job_id
    assert started["own_texts"] == len(TEXTS) and started["request"]["texts"] is None
    assert started["request"]["model_ref"] == "tiny:llama" and started["matches_job_settings"] is True
    audit = wait_for_end(api, job_id, started["id"])
    assert audit["status"] == "completed", audit["error"]
    result = audit["result"]
    assert {a["attack"] for a in result["attacks"]} == {
        "known_weights_inversion",
        "learned_inverter",
        "gradient_next_token",
    }
    for attack in result["attacks"]:
        assert 0.0 <= attack["token_recovery"] <= 1.0 and attack["tokens"] > 0
        low, high = attack["token_recovery_ci"]
        assert low <= attack["token_recovery"] <= high
    strongest = max(result["attacks"], key=lambda a: a["token_recovery"])
    assert result["strongest_token_recovery"] == strongest["token_recovery"]
    assert result["request"]["texts"] is None  # the admin's texts are counted, never echoed
    assert audit["started_at"] and audit["finished_at"] and audit["progress"] is None
    listed = api.ok("GET", f"/jobs/{job_id}/privacy-audits")
    assert listed["total"] == 1 and listed["items"][0] == audit
    events = api.ok("GET", "/audit", params={"object_type": "job", "object_id": str(job_id)})["items"]
    start_event = next(e for e in events if e["action"] == "privacy_audit.start")
    assert start_event["detail"]["audit_id"] == audit["id"] and start_event["detail"]["sequences"] == 4

    # The data owner's invitation and job view carry the strongest attack of these very settings.
    invitation = _invitation(agent, job_id)
    assert invitation["audited_token_recovery"] == result["strongest_token_recovery"]
    assert invitation["audited_attack"] == result["strongest_attack"]
    agent_view = agent.api.ok("GET", f"/agent/jobs/{job_id}")
    assert agent_view["audited_token_recovery"] == result["strongest_token_recovery"]
    operator_view = api.ok("GET", f"/jobs/{job_id}")  # the dashboard's privacy card shows the same figure
    assert operator_view["audited_token_recovery"] == result["strongest_token_recovery"]
    assert operator_view["audited_attack"] == result["strongest_attack"]
    # Another job with the same settings was never audited: no figure there.
    other_id = tiny_job(api, ["owner-a"])
    api.ok("POST", f"/jobs/{other_id}/open")
    assert _invitation(agent, other_id)["audited_token_recovery"] is None

    # The job's privacy changes: the audit no longer speaks for it.
    with app.state.session_factory() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        job.privacy = {**job.privacy, "activation_noise": 0.5}
    invitation = _invitation(agent, job_id)
    assert invitation["audited_token_recovery"] is None and invitation["audited_attack"] is None
    assert api.ok("GET", f"/jobs/{job_id}/privacy-audits")["items"][0]["matches_job_settings"] is False


def _invitation(agent: Agent, job_id: int) -> dict[str, Any]:
    return next(i for i in agent.api.ok("GET", "/agent/invitations") if i["job_id"] == job_id)


@pytest.mark.slow
def test_a_failing_audit_ends_failed_with_its_reason(api: Api) -> None:
    job_id = api.ok("POST", "/jobs", 201, json=job_spec([], model_ref="/nonexistent/no-such-model"))["id"]
    started = api.ok("POST", f"/jobs/{job_id}/privacy-audits", 202, json=QUICK)
    audit = wait_for_end(api, job_id, started["id"])
    assert audit["status"] == "failed" and audit["result"] is None
    assert "/nonexistent/no-such-model" in audit["error"]


@pytest.mark.slow
def test_a_restarted_in_process_control_plane_fails_the_audits_it_was_running(
    api: Api, settings: Settings
) -> None:
    job_id = tiny_job(api, [])
    audit_id = api.ok("POST", f"/jobs/{job_id}/privacy-audits", 202, json=QUICK)["id"]
    with TestClient(create_server_app(settings)) as restarted:  # the same database, a new process's state
        audit = Api(restarted).ok("GET", f"/jobs/{job_id}/privacy-audits/{audit_id}")
    # Nothing read the audit's records in the first process, so its row still said queued.
    assert audit["status"] == "failed" and audit["error"] == RESTARTED.format(status="queued")
    # The job is free for a new audit at once.
    assert api.post(f"/jobs/{job_id}/privacy-audits", json=QUICK).status_code == 202


def test_a_report_stored_by_another_version_never_breaks_the_list_or_the_invitations(
    api: Api, app: FastAPI
) -> None:
    """A completed row whose report no longer validates (the report models changed since it was written)."""
    agent = enroll(api, "owner-c")
    job_id = tiny_job(api, ["owner-c"])
    api.ok("POST", f"/jobs/{job_id}/open")
    stored = {"strongest_token_recovery": 0.25, "strongest_attack": "learned_inverter", "attacks": "renamed"}
    with app.state.session_factory() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        request = job_audit_request(job, {"sequences": 4})
        session.add(
            PrivacyAuditRun(
                job_id=job_id,
                status="completed",
                task_key="old-version",
                request=request.model_dump(mode="json"),
                settings_key=settings_key(request),
                result=stored,
                created_by="admin",
                created_at=utc_now(),
                finished_at=utc_now(),
            )
        )
    [audit] = api.ok("GET", f"/jobs/{job_id}/privacy-audits")["items"]
    assert audit["status"] == "completed" and audit["result"] is None
    assert audit["error"].startswith("the stored report does not match this version's report format: ")
    assert "attacks: Input should be a valid list" in audit["error"]
    assert api.ok("GET", f"/jobs/{job_id}/privacy-audits/{audit['id']}") == audit
    invitation = _invitation(agent, job_id)
    assert (invitation["audited_token_recovery"], invitation["audited_attack"]) == (0.25, "learned_inverter")


# --- who may, and what is refused -------------------------------------------------------------------


def test_only_admins_start_audits_viewers_read_them_clients_touch_nothing(api: Api) -> None:
    viewer = api.as_(api.ok("POST", "/tokens", 201, json={"name": "v", "role": "viewer"})["token"])
    agent = enroll(api, "owner-b")
    job_id = tiny_job(api, ["owner-b"])
    api.ok("POST", f"/jobs/{job_id}/open")
    path = f"/jobs/{job_id}/privacy-audits"
    status, code, message = error_of(viewer.post(path, json=SMALL))
    assert (status, code) == (403, "insufficient_role") and "admin" in message
    for method in ("GET", "POST"):
        assert agent.api.request(method, path, json=SMALL).status_code == 403
    assert agent.api.get(f"{path}/1").status_code == 403
    assert api.as_(None).post(path, json=SMALL).status_code == 401
    assert viewer.ok("GET", path) == {"items": [], "total": 0, "limit": 50, "offset": 0}
    assert api.ok("GET", path)["total"] == 0  # nothing was started by the refused calls


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"sequences": 0}, "body.sequences: Input should be greater than or equal to 1"),
        ({"sequences": 100_000}, "body.sequences: Input should be less than or equal to 256"),
        ({"seq_len": 2}, "body.seq_len: Input should be greater than or equal to 4"),
        ({"corpus": "emails"}, "body.corpus: Input should be 'news' or 'tweets'"),
        ({"corpus": "news", "texts": ["a b c d e"]}, "give either corpus or texts, not both"),
        ({"texts": []}, "body.texts: List should have at least 1 item"),
        ({"texts": [""]}, "body.texts.0: String should have at least 1 character"),
        ({"texts": ["x" * 20_001]}, "body.texts.0: String should have at most 20000 characters"),
        ({"attacks": ["psychic"]}, "body.attacks.0: Input should be 'known_weights_inversion'"),
        ({"attacks": ["learned_inverter", "learned_inverter"]}, "attacks contains duplicates"),
        ({"attacks": []}, "body.attacks: List should have at least 1 item"),
        ({"seed": -1}, "body.seed: Input should be greater than or equal to 0"),
        ({"model_ref": "other"}, "body.model_ref: unknown field; allowed: sequences, seq_len, corpus, texts"),
        ({"privacy": {"activation_noise": 9}}, "body.privacy: unknown field; allowed: sequences"),
        ({"sequence": 4}, "body.sequence: unknown field; did you mean sequences?"),
        ([1, 2], "body: Input should be a valid dictionary"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(api: Api, body: Any, words: str) -> None:
    job_id = tiny_job(api, [])
    status, code, message = error_of(api.post(f"/jobs/{job_id}/privacy-audits", json=body))
    assert (status, code) == (422, "validation_error") and words in message
    assert api.ok("GET", f"/jobs/{job_id}/privacy-audits")["total"] == 0


def test_unknown_jobs_and_audits_are_404_and_unauditable_settings_422(api: Api) -> None:
    status, code, message = error_of(api.post("/jobs/999999/privacy-audits", json=SMALL))
    assert (status, code) == (404, "job_not_found") and "999999" in message
    assert error_of(api.get("/jobs/999999/privacy-audits"))[:2] == (404, "job_not_found")
    assert api.post("/jobs/0/privacy-audits", json=SMALL).status_code == 422
    job_id = tiny_job(api, [], adapter={"kind": "lora", "r": 1000, "alpha": 16})
    status, code, message = error_of(api.post(f"/jobs/{job_id}/privacy-audits", json=SMALL))
    assert (status, code) == (422, "job_not_auditable")
    assert f"job {job_id}'s settings cannot be audited: adapter_r" in message
    other = tiny_job(api, [])
    status, code, message = error_of(api.get(f"/jobs/{other}/privacy-audits/424242"))
    assert (status, code) == (404, "privacy_audit_not_found") and "424242" in message


# --- on Celery: queued until a worker takes it (none here), lost when its worker stops beating ---------


@pytest.fixture
def celery_api(settings: Settings, redis_url: str) -> Iterator[tuple[Api, FastAPI, RedisBlobStore]]:
    """The control plane with the Celery executor on Redis database 13 (no other test's workers there), and
    no worker consuming the audits' queue: an audit stays queued (the queue is emptied afterwards)."""
    url = redis_url.rsplit("/", 1)[0] + "/13"
    app = create_server_app(settings.model_copy(update={"executor": "celery", "redis_url": url}))
    client = redis.Redis.from_url(url)
    try:
        with TestClient(app) as http:
            yield Api(http), app, app.state.step_relay.store
    finally:
        client.delete(PRIVACY_QUEUE)
        client.close()


def test_one_audit_per_job_at_a_time_and_a_queued_audit_times_out(
    celery_api: tuple[Api, FastAPI, RedisBlobStore],
) -> None:
    api, app, store = celery_api
    job_id = tiny_job(api, [])
    first = api.ok("POST", f"/jobs/{job_id}/privacy-audits", 202, json=SMALL)
    status, code, message = error_of(api.post(f"/jobs/{job_id}/privacy-audits", json=SMALL))
    assert (status, code) == (409, "privacy_audit_running")
    assert f"privacy audit {first['id']} of job {job_id} is queued" in message
    other_job = tiny_job(api, [])  # another job's audit is not held up
    api.ok("POST", f"/jobs/{other_job}/privacy-audits", 202, json=SMALL)
    assert api.ok("GET", f"/jobs/{job_id}/privacy-audits")["items"][0]["status"] == "queued"

    # No worker took it within the queue timeout: housekeeping fails it, in words that say what to check.
    timeout = app.state.settings.privacy_audit_queue_timeout_s
    later = utc_now() + timedelta(seconds=timeout + 1)
    report = run_housekeeping(app.state.session_factory, later, 60.0, None, 86400.0, store, timeout)
    assert first["id"] in report.privacy_audits_synced
    audit = api.ok("GET", f"/jobs/{job_id}/privacy-audits/{first['id']}")
    assert audit["status"] == "failed" and audit["error"] == NOT_PICKED_UP.format(timeout=timeout)
    second = api.ok("POST", f"/jobs/{job_id}/privacy-audits", 202, json=SMALL)
    listed = api.ok("GET", f"/jobs/{job_id}/privacy-audits")["items"]
    assert [a["id"] for a in listed] == [second["id"], first["id"]]  # newest first


def test_progress_is_read_from_the_records_and_a_silent_worker_fails_the_audit(
    celery_api: tuple[Api, FastAPI, RedisBlobStore],
) -> None:
    """The records a worker writes (flglm.contracts.privacy_records), written here as a worker would."""
    api, app, store = celery_api
    job_id = tiny_job(api, [])
    audit_id = api.ok("POST", f"/jobs/{job_id}/privacy-audits", 202, json=SMALL)["id"]
    with app.state.session_factory() as session:
        query = sa.select(PrivacyAuditRun.task_key).where(PrivacyAuditRun.id == audit_id)
        task_key = session.scalars(query).one()
    records = AuditRecords(store, task_key)
    records.mark_started()
    stage = "learned inverter (training steps)"
    records.write_progress(AuditProgress(stage=stage, done=30, total=300, at=datetime.now(UTC)))
    audit = api.ok("GET", f"/jobs/{job_id}/privacy-audits/{audit_id}")
    assert audit["status"] == "running" and audit["started_at"] is not None
    assert audit["progress"] == {"stage": stage, "done": 30, "total": 300}
    assert api.post(f"/jobs/{job_id}/privacy-audits", json=SMALL).status_code == 409

    store.delete(f"privacy-audit:{task_key}:progress")  # the heartbeat stopped: HEARTBEAT_TTL_S passed
    audit = api.ok("GET", f"/jobs/{job_id}/privacy-audits/{audit_id}")
    assert audit["status"] == "failed" and audit["error"] == LOST.format(ttl=HEARTBEAT_TTL_S)
    assert audit["progress"] is None


def test_an_unreachable_queue_is_a_503_and_leaves_no_audit(settings: Settings) -> None:
    app = create_server_app(
        settings.model_copy(update={"executor": "celery", "redis_url": "redis://127.0.0.1:1/0"})
    )
    with TestClient(app) as http:
        api = Api(http)
        job_id = tiny_job(api, [])
        status, code, message = error_of(api.post(f"/jobs/{job_id}/privacy-audits", json=SMALL))
        assert (status, code) == (503, "task_queue_unavailable") and "could not be queued" in message
        assert api.ok("GET", f"/jobs/{job_id}/privacy-audits")["total"] == 0
        events = api.ok("GET", "/audit", params={"object_type": "job", "object_id": str(job_id)})["items"]
        assert "privacy_audit.start" not in [e["action"] for e in events]
