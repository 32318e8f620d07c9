"""Split generation over HTTPS with the body on a worker (embedded in-process executor).

The generate route and the session routes that `flglm generate` uses give the unsplit model's greedy tokens;
bad input is refused with a clear 4xx.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from typer.testing import CliRunner

from apps.cli.artifacts import labelled_completions
from apps.cli.main import app as cli
from backend.settings import Settings
from flglm.generation import encode_body_input
from flglm.generation_client import GenerationApiError
from flglm.generation_protocol import TENSORS_MEDIA_TYPE
from tests.support.control_plane import ADMIN_TOKEN, Api, LiveServer, job_spec
from tests.support.generation_jobs import (
    HIDDEN,
    NEW_TOKENS,
    PROMPTS,
    body_call,
    generate_through_sessions,
    session_client,
    trained_job,
)


def test_generate_route_and_session_routes_equal_the_unsplit_model(
    live_server: LiveServer, api: Api, settings: Settings
) -> None:
    job_id, reference = trained_job(api, settings)

    # (a) The API route: front and back in the backend, the body on the (in-process) worker.
    answer = api.ok(
        "POST", f"/jobs/{job_id}/generate", json={"prompts": PROMPTS, "max_new_tokens": NEW_TOKENS}
    )
    assert answer["completions"] == reference.completions
    assert answer["server_checkpoint"].startswith("step-")

    # The session routes, token for token (the caller's half is what `flglm generate` runs).
    sequences = generate_through_sessions(live_server, api, job_id, reference)
    assert sequences.shape[1] > reference.input_ids.shape[1]
    assert torch.equal(sequences, reference.sequences)

    # (b) The CLI against the live server: remote body, session closed at the end.
    args = ["generate", str(job_id), "--max-new-tokens", str(NEW_TOKENS)]
    for prompt in PROMPTS:
        args += ["-p", prompt]
    args += [
        "--server",
        live_server.base_url,
        "--token",
        ADMIN_TOKEN,
        "--ca-cert",
        str(live_server.tls.ca_cert),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    # The raw bytes (`output` turns "\r\n" into "\n"): each completion under its prompt, escaped.
    assert result.stdout_bytes.decode() == labelled_completions(list(PROMPTS), reference.completions)
    assert "\r" not in result.stdout_bytes.decode()
    opened = [e for e in api.ok("GET", "/audit")["items"] if e["action"] == "job.generate_session"]
    assert len(opened) == 2  # the Python session above and the CLI's, each audited
    for event in opened:  # both were closed: the worker no longer holds them
        assert (
            api.request(
                "DELETE", f"/jobs/{job_id}/generate/sessions/{event['detail']['session']}"
            ).status_code
            == 404
        )
    # --local-body runs the body in the CLI process: the same text.
    local = CliRunner().invoke(cli, [*args, "--local-body"])
    assert local.exit_code == 0, local.output
    assert local.stdout_bytes == result.stdout_bytes


def test_session_routes_refuse_bad_input(live_server: LiveServer, api: Api, settings: Settings) -> None:
    untrained = api.ok("POST", "/jobs", 201, json=job_spec([], model_ref="tiny:llama"))["id"]
    refused = api.post(f"/jobs/{untrained}/generate/sessions")
    assert refused.status_code == 409 and "no server adapter checkpoint" in refused.text
    assert api.post("/jobs/999/generate/sessions").status_code == 404
    job_id, _ = trained_job(api, settings)
    viewer = api.ok("POST", "/tokens", 201, json={"name": "v", "role": "viewer"})["token"]
    assert api.as_(viewer).post(f"/jobs/{job_id}/generate/sessions").status_code == 403
    assert api.as_(None).post(f"/jobs/{job_id}/generate/sessions").status_code == 401

    session_id = api.ok("POST", f"/jobs/{job_id}/generate/sessions", 201)["session_id"]
    hidden, mask = torch.randn(1, 3, HIDDEN), torch.ones(1, 3, dtype=torch.long)  # (batch, seq, hidden)
    good = encode_body_input(hidden, mask)
    assert body_call(api.as_(viewer), job_id, session_id, good) == 403
    assert body_call(api, job_id, uuid.uuid4().hex, good) == 404  # unknown session
    assert body_call(api, job_id, "not-a-session-id", good) == 422
    wrong_hidden = encode_body_input(torch.randn(1, 3, HIDDEN + 1), mask)
    response = api.post(
        f"/jobs/{job_id}/generate/sessions/{session_id}/body",
        content=wrong_hidden,
        headers={"Content-Type": TENSORS_MEDIA_TYPE},
    )
    assert response.status_code == 422 and f"expected (batch, new, {HIDDEN})" in response.text
    too_many_rows = encode_body_input(torch.randn(9, 1, HIDDEN), torch.ones(9, 1, dtype=torch.long))
    assert body_call(api, job_id, session_id, too_many_rows) == 422
    bad_mask = encode_body_input(hidden, torch.full((1, 3), 2))
    assert body_call(api, job_id, session_id, bad_mask) == 422
    assert body_call(api, job_id, session_id, b"not safetensors") == 422
    assert body_call(api, job_id, session_id, b"") == 400
    assert body_call(api, job_id, session_id, good, media="application/json") == 415
    assert body_call(api, job_id, session_id, good) == 200
    assert body_call(api, job_id, session_id, good) == 409  # the mask does not continue the cache (3 + 3)
    next_mask = torch.ones(1, 4, dtype=torch.long)
    assert body_call(api, job_id, session_id, encode_body_input(hidden[:, :1], next_mask)) == 200

    assert (
        api.as_(viewer).request("DELETE", f"/jobs/{job_id}/generate/sessions/{session_id}").status_code == 403
    )
    assert api.request("DELETE", f"/jobs/{job_id}/generate/sessions/{session_id}").status_code == 204
    assert api.request("DELETE", f"/jobs/{job_id}/generate/sessions/{session_id}").status_code == 404
    assert body_call(api, job_id, session_id, good) == 404  # closed
    with session_client(live_server, job_id, viewer) as remote, pytest.raises(GenerationApiError) as refusal:
        remote.open()
    assert refusal.value.status == 403 and "needs role admin" in refusal.value.message
