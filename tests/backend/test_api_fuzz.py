"""Schemathesis against the app's own `/openapi.json`: every operation, as admin, viewer, an enrolled agent
and anonymous, on SQLite and PostgreSQL. No answer may be a 5xx, and every status must be documented.

Each operation gets up to `COVERAGE_CASES` boundary cases (schemathesis' coverage phase), then `EXAMPLES`
schema-conforming (positive) and `EXAMPLES` schema-violating (negative) random cases, without shrinking;
every distinct failure (operation, check, status) is reported with its reproducing curl command. The agent
holds a running job (id 1 on a fresh database), so agent and admin routes get past their 404s with small ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err, Ok
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import status_code_conformance

from backend.settings import Settings
from flglm.generation_protocol import TENSORS_MEDIA_TYPE
from tests.support.control_plane import ADMIN_TOKEN, Api, enroll, running_job

# The generation body route also takes safetensors: sent as raw bytes, like application/octet-stream.
schemathesis.serializer.alias(TENSORS_MEDIA_TYPE, "application/octet-stream")

# Per operation and role: up to COVERAGE_CASES boundary cases, then EXAMPLES positive and EXAMPLES negative
# random ones. FLGLM_FUZZ_EXAMPLES=100 digs deeper by hand (minutes per database).
EXAMPLES = int(os.environ.get("FLGLM_FUZZ_EXAMPLES", "6"))
ROLES = ("admin", "viewer", "agent", "anonymous")
COVERAGE_CASES = 40
LAST = {"DELETE /api/v1/tokens/{token_id}"}
CHECKS = [not_a_server_error, status_code_conformance]


@dataclass
class Findings:
    operations: set[str] = field(default_factory=set)
    cases: int = 0
    # (operation, check, status) -> one reproducing command
    failures: dict[tuple[str, str, int], str] = field(default_factory=dict)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The contract tests' settings, with work long-polls answered at once: an agent case may drop the
    agent from its job (`POST …/failure`); its later `GET /agent/work?wait_s=60` would wait a minute."""
    return settings.model_copy(update={"work_wait_max_s": 0.0})


@pytest.fixture
def credentials(app: FastAPI) -> Iterator[dict[str, str | None]]:
    """One bearer credential per role; the agent is a participant of a running job."""
    with TestClient(app) as client:
        api = Api(client)
        viewer = api.ok("POST", "/tokens", 201, json={"name": "fuzz-viewer", "role": "viewer"})["token"]
        agent = enroll(api, "fuzz-agent")
        # The tiny model: an admin case that starts a privacy audit of this job must finish in seconds (the
        # app's shutdown waits for it), not run a SmolLM2 inversion for many minutes.
        running_job(api, [agent], min_clients=1, model_ref="tiny:llama")
        yield {"admin": ADMIN_TOKEN, "viewer": viewer, "agent": agent.credential, "anonymous": None}


def fuzz(app: FastAPI, token: str | None) -> Findings:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    findings = Findings()

    def check(operation: APIOperation, case: schemathesis.Case) -> None:
        findings.cases += 1
        response = case.call(headers=headers)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:  # every distinct failure, instead of stopping at the first
            for failure in group.exceptions:
                key = (operation.label, type(failure).__name__, response.status_code)
                findings.failures.setdefault(
                    key, f"{case.as_curl_command(headers=headers)}\n    {response.text[:300]}"
                )

    # An admin may revoke its own token (then every later answer is a 401): that operation goes last.
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), [
        result.err() for result in results if isinstance(result, Err)
    ]
    loaded = [result.ok() for result in results if isinstance(result, Ok)]
    operations = sorted(loaded, key=lambda operation: operation.label in LAST)
    for operation in operations:
        findings.operations.add(operation.label)
        # Boundary values first (schemathesis' coverage phase: each constraint just met and just broken).
        coverage = schema.iter_coverage_cases(
            operation,
            generation_modes=list(GenerationMode),
            generation_config=schema.config.generation_for(operation=operation),
        )
        for case in islice(coverage, COVERAGE_CASES):
            check(operation, case)
        # Then random cases that fit the schema and that break it.
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis_settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                check(operation, case)  # noqa: B023 - run() is called in this iteration

            try:
                run()
            except Unsatisfiable:  # no negative case exists for an operation without parameters or body
                assert mode is GenerationMode.NEGATIVE, operation.label
    return findings


# 1.5 to 2 minutes for the 8 combinations on 2 cores (over a minute: `slow`, which `make test` still runs).
# The admin starts real privacy audits of the running job, which the app's shutdown waits for.
@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
def test_no_server_error_and_no_undocumented_status(
    app: FastAPI, credentials: dict[str, str | None], role: str
) -> None:
    findings = fuzz(app, credentials[role])
    assert len(findings.operations) >= 40, sorted(findings.operations)
    report = "\n\n".join(f"{key}: {detail}" for key, detail in sorted(findings.failures.items()))
    assert not findings.failures, f"{len(findings.failures)} failures in {findings.cases} cases:\n{report}"


# --- what the fuzzer found, one regression test each ----------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{"object_type": "\x00"}, {"object_id": "1\x00"}, {"object_type": "j" * 33}, {"object_id": "1" * 65}],
    ids=["nul-type", "nul-id", "long-type", "long-id"],
)
def test_audit_filters_are_bounded_where_they_enter(api: Api, params: dict[str, str]) -> None:
    """A NUL in `GET /audit?object_type=` or `object_id=` was a 500 on PostgreSQL (text refuses NUL)."""
    response = api.get("/audit", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    assert api.ok("GET", "/audit", params={"object_type": "api_token", "object_id": "1"})["total"] >= 0
