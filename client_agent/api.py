"""Thin control-plane client for the agent (enroll, heartbeat, invitations, consent, work, round done,
metrics) over the shared `flglm.protocol` models, and the mapping of failures to the agent's exit codes."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flglm import protocol
from flglm.contracts.disclosures import disclosed_round_metrics
from flglm.protocol import PROTOCOL_VERSION
from flglm.step_client import (
    StepCertificateError,
    StepClient,
    StepConflict,
    StepForbidden,
    StepHttpError,
    StepServerUnavailable,
    StepUnauthorized,
)

PROTOCOL_MISMATCH_STATUSES = (426,)


class ExitCode(enum.IntEnum):
    """`flglm agent` exit codes (also listed in `flglm agent --help`)."""

    done = 0
    bad_usage_or_data = 2
    revoked = 3  # 401: credential revoked or unknown
    forbidden = 4  # 403
    unreachable = 5  # connection errors / 5xx after every retry
    protocol_mismatch = 6  # the server speaks another protocol version (426)
    stale_round = 7  # 409 that a retry cannot fix
    failed = 8  # the job failed or anything else


EXIT_CODES_HELP = (
    "Exit codes: 0 done; 2 bad usage or bad data (nothing sent); 3 credential revoked/unknown (401); "
    "4 forbidden (403); 5 server unreachable after retries; 6 protocol-version mismatch; "
    "7 stale round / conflict (409); 8 job failed or other error."
)


class AgentFailure(RuntimeError):
    """A failure the CLI reports in one clear line and turns into `exit_code`."""

    def __init__(self, exit_code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def failure_from(exc: BaseException) -> AgentFailure:
    """The exit code and message for an error raised while talking to the server."""
    if isinstance(exc, AgentFailure):
        return exc
    if isinstance(exc, StepUnauthorized):
        return AgentFailure(
            ExitCode.revoked,
            f"the server refused this agent's credential ({exc.message}); it was revoked or is unknown — "
            "ask the operator for a new enrollment token and run `flglm agent enroll` again",
        )
    if isinstance(exc, StepForbidden):
        return AgentFailure(ExitCode.forbidden, f"forbidden by the server: {exc.message}")
    if isinstance(exc, StepConflict):
        return AgentFailure(
            ExitCode.stale_round, f"conflict with the server's state ({exc.code}): {exc.message}"
        )
    if isinstance(exc, StepHttpError) and exc.status in PROTOCOL_MISMATCH_STATUSES:
        return AgentFailure(
            ExitCode.protocol_mismatch,
            f"protocol-version mismatch (agent speaks {PROTOCOL_VERSION}): {exc.message}; upgrade the agent",
        )
    if isinstance(exc, StepCertificateError):
        return AgentFailure(
            ExitCode.bad_usage_or_data,
            f"{exc}: a certificate problem, not a network one — give the CA certificate that signed the "
            "server's (`flglm serve` prints its path) with `flglm agent enroll --ca-cert PATH`",
        )
    if isinstance(exc, StepServerUnavailable):
        return AgentFailure(ExitCode.unreachable, f"server unreachable: {exc}")
    if isinstance(exc, StepHttpError):
        return AgentFailure(ExitCode.failed, f"the server answered {exc.status} {exc.code}: {exc.message}")
    return AgentFailure(ExitCode.failed, f"{type(exc).__name__}: {exc}")


class ControlPlaneClient(StepClient):
    """`StepClient` (same retries, TLS verification, typed 4xx and protocol-version header) plus the
    agent's JSON endpoints."""

    def __init__(
        self, base_url: str, credential: str | None, ca_cert: str | Path | None = None, **kwargs: Any
    ) -> None:
        super().__init__(base_url, credential or "", ca_cert, **kwargs)
        if credential is None:  # enrollment is the only unauthenticated call
            del self._http.headers["Authorization"]

    def __enter__(self) -> ControlPlaneClient:
        return self

    def _json(self, method: str, path: str, body: BaseModel | None = None) -> Any:
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        response = (
            self._request(method, path, json=payload) if payload is not None else self._request(method, path)
        )
        return response.json()

    def enroll(self, body: protocol.EnrollRequest) -> protocol.EnrollResponse:
        return protocol.EnrollResponse.model_validate(self._json("POST", protocol.ENROLL_PATH, body))

    def heartbeat(self, example_count: int | None) -> protocol.HeartbeatResponse:
        body = protocol.HeartbeatRequest(example_count=example_count)
        return protocol.HeartbeatResponse.model_validate(self._json("POST", protocol.HEARTBEAT_PATH, body))

    def invitations(self) -> list[protocol.InvitationView]:
        return [
            protocol.InvitationView.model_validate(i) for i in self._json("GET", protocol.INVITATIONS_PATH)
        ]

    def decide(self, job_id: int, decision: protocol.ConsentDecision) -> protocol.InvitationView:
        path = protocol.INVITATION_DECISION_PATH.format(job_id=job_id)
        return protocol.InvitationView.model_validate(
            self._json("POST", path, protocol.ConsentRequest(decision=decision))
        )

    def work(self, wait_s: float = 0.0) -> list[protocol.WorkAssignment]:
        """The open rounds to work on; with `wait_s` a long-poll that answers once there are some (or a job of
        this agent changed), at the latest after `wait_s`."""
        if wait_s <= 0:
            return protocol.WorkResponse.model_validate(self._json("GET", protocol.WORK_PATH)).assignments
        response = self._request(
            "GET",
            protocol.WORK_PATH,
            params={"wait_s": f"{wait_s:.3f}"},
            timeout=wait_s + self.request_timeout_s,
        )
        return protocol.WorkResponse.model_validate(response.json()).assignments

    def job(self, job_id: int) -> protocol.AgentJobView:
        return protocol.AgentJobView.model_validate(
            self._json("GET", protocol.AGENT_JOB_PATH.format(job_id=job_id))
        )

    def round_done(
        self, job_id: int, round_number: int, body: protocol.RoundDoneRequest
    ) -> protocol.RoundDoneResponse:
        path = protocol.ROUND_DONE_PATH.format(job_id=job_id, round_number=round_number)
        disclosed = body.model_copy(update={"eval_metrics": disclosed_round_metrics(body.eval_metrics)})
        return protocol.RoundDoneResponse.model_validate(self._json("POST", path, disclosed))

    def step_metric(self, job_id: int, metric: protocol.StepMetricIn) -> None:
        self._json("POST", protocol.STEP_METRICS_PATH.format(job_id=job_id), metric)

    def report_failure(self, job_id: int, reason: str) -> protocol.AgentFailureResponse:
        body = protocol.AgentFailureRequest(reason=reason[: protocol.MAX_FAILURE_REASON_CHARS])
        path = protocol.AGENT_FAILURE_PATH.format(job_id=job_id)
        return protocol.AgentFailureResponse.model_validate(self._json("POST", path, body))
