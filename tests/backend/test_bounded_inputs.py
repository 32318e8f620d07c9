"""Every number an agent sends is bounded where it enters: a hostile one is a 422 naming it, never a 500."""

from __future__ import annotations

import json

from flglm.step_protocol import CLIENT_ADAPTERS_PATH, MAX_EXAMPLE_COUNT
from tests.support.control_plane import Api, enroll, enrollment_token, job_spec, running_job


def test_a_fedavg_weight_beyond_the_bound_is_refused_before_anything_is_stored(api: Api) -> None:
    """One agent's `example_count=1e400` used to overflow the round's FedAvg weighting: every participant's
    download answered 500 until the round timed out."""
    agent = enroll(api, "weigher")
    job_id = running_job(api, [agent])
    path = CLIENT_ADAPTERS_PATH.format(job_id=job_id, round_number=1)
    for count in (10**400, MAX_EXAMPLE_COUNT + 1, -1):
        response = agent.api.request(
            "PUT",
            path,
            params={"example_count": str(count)},
            content=b"sealed",
            headers={"content-type": "application/octet-stream"},
        )
        assert response.status_code == 422, (count, response.text)
        assert "example_count" in response.json()["error"]["message"]


def test_an_enrollment_claiming_too_many_examples_is_refused(api: Api) -> None:
    token = enrollment_token(api, "boaster")
    body = {"token": token, "public_key": "B" * 43 + "=", "example_count": 10**30}
    response = api.as_(None).post("/agent/enroll", json=body)
    assert response.status_code == 422 and "example_count" in response.json()["error"]["message"]


def test_hostile_numbers_and_strings_are_422s_naming_the_field_and_store_nothing(api: Api) -> None:
    """Each of these used to be a 500 (OverflowError, PostgreSQL out of range, NUL in text), or was stored
    as given (Infinity read back as null; NaN; a metric for step 1e9 of a 5-step job)."""
    cases: list[tuple[str, str, dict[str, object], str]] = [
        ("POST", "/jobs", job_spec([], round_timeout_s="Infinity"), "round_timeout_s"),
        ("POST", "/jobs", job_spec([], round_timeout_s=1e300), "round_timeout_s"),
        ("POST", "/jobs", job_spec([], hyperparameters={"lr": "NaN"}), "lr"),
        ("POST", "/jobs", job_spec([], name="bad\x00name"), "name"),
        ("POST", "/jobs", job_spec([], min_clients=2**63), "min_clients"),
        ("POST", "/jobs", job_spec([], hyperparameters={"labels": ["a\x00"]}), "labels"),
        ("POST", "/tokens", {"name": "x\x00", "role": "viewer"}, "name"),
    ]
    for method, path, body, field in cases:
        raw = json.dumps(body).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
        response = api.request(method, path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422, (body, response.text)
        assert field in response.json()["error"]["message"], response.text
    for path in ("/jobs/2147483648", "/jobs/99999999999999999999", "/clients/2147483648"):
        assert api.get(path).status_code == 422, path
    assert api.get("/jobs", params={"offset": 2**63}).status_code == 422
    assert api.ok("GET", "/jobs")["total"] == 0


def test_a_metric_must_name_a_step_of_the_jobs_plan(api: Api) -> None:
    agent = enroll(api, "reporter")
    job_id = running_job(api, [agent])  # 5 steps per round
    for bad in ({"step": 5}, {"step": 10**9}, {"step": 2**40}, {"tokens": 2**63}, {"loss": "NaN"}):
        body = json.dumps({"round_number": 1, "step": 0, **bad}).replace('"NaN"', "NaN")
        response = agent.api.request(
            "POST",
            f"/agent/jobs/{job_id}/metrics",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422, (bad, response.text)
    keys = {f"phase-{index}": 0.1 for index in range(65)}
    response = agent.api.post(
        f"/agent/jobs/{job_id}/metrics", json={"round_number": 1, "step": 0, "phase_timings_s": keys}
    )
    assert response.status_code == 422 and "phase_timings_s" in response.text
    agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json={"round_number": 1, "step": 4})
    assert api.ok("GET", "/metrics", params={"job_id": job_id})["total"] == 1
