"""Every number an agent sends is bounded where it enters: a hostile one is a 422 naming it, never a 500."""

from __future__ import annotations

from flglm.step_protocol import CLIENT_ADAPTERS_PATH, MAX_EXAMPLE_COUNT
from tests.support.control_plane import Api, enroll, enrollment_token, running_job


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
