"""`StepClient` retry policy: transport failures and 5xx are retried with backoff, 4xx raise typed errors."""

from __future__ import annotations

import httpx
import pytest

from flglm.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from flglm.step_client import StepClient, StepConflict, StepRejectedPayload, StepServerUnavailable
from flglm.step_protocol import MessageDirection, MessageRef

REF = MessageRef(
    job_id=3, round_number=1, step=0, client_id=7, direction=MessageDirection.activations, sequence=5
)
RECEIPT = {"message": REF.model_dump(mode="json"), "outcome": "stored", "result_path": None}


def client_with(answers: list[httpx.Response | Exception], seen: list[httpx.Request]) -> StepClient:
    """A StepClient whose network answers with `answers` in order (a flaky link, not a fake server)."""

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return StepClient(
        "https://backend.test", "cred", transport=httpx.MockTransport(respond), max_retries=3, backoff_s=0.001
    )


def test_connection_errors_and_5xx_are_retried_with_the_same_bytes() -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"error": {"code": "replica_busy", "message": "busy"}}),
        httpx.Response(201, json=RECEIPT),
    ]
    with client_with(answers, seen) as client:
        receipt = client.upload(REF, b"sealed")
    assert receipt.outcome == "stored"
    assert [r.url.path for r in seen] == ["/api/v1/agent/jobs/3/rounds/1/steps/0/activations/5"] * 3
    assert {r.content for r in seen} == {b"sealed"}
    assert all(r.headers["Authorization"] == "Bearer cred" for r in seen)
    assert all(r.headers[PROTOCOL_HEADER] == PROTOCOL_VERSION for r in seen)
    assert all(r.headers["Content-Type"] == "application/octet-stream" for r in seen)


def test_persistent_failure_gives_up_after_max_retries() -> None:
    seen: list[httpx.Request] = []
    with (
        client_with([httpx.Response(502, text="bad gateway")] * 4, seen) as client,
        pytest.raises(StepServerUnavailable, match="failed 4 times"),
    ):
        client.upload(REF, b"sealed")
    assert len(seen) == 4


@pytest.mark.parametrize(
    "status, code, kind",
    [(409, "replayed_message", StepConflict), (422, "wrong_tensor", StepRejectedPayload)],
)
def test_4xx_raise_typed_errors_without_retrying(status: int, code: str, kind: type[Exception]) -> None:
    seen: list[httpx.Request] = []
    answer = httpx.Response(status, json={"error": {"code": code, "message": "named problem"}})
    with client_with([answer], seen) as client, pytest.raises(kind) as raised:
        client.upload(REF, b"sealed")
    assert len(seen) == 1
    assert raised.value.code == code and raised.value.message == "named problem"  # type: ignore[attr-defined]


def test_long_poll_asks_again_after_204_and_returns_the_result() -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [httpx.Response(204), httpx.Response(200, content=b"h1")]
    with client_with(answers, seen) as client:
        assert client.wait_result(REF, timeout_s=30) == b"h1"
    assert [r.url.path.endswith("/activations/5/result") for r in seen] == [True, True]
    assert all(0 < float(r.url.params["wait_s"]) <= 30 for r in seen)
