"""Operator-side models of jobs, participants and rounds (submission uses `flglm.protocol.JobSpec`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from flglm.contracts.request_model import StrictModel
from flglm.privacy.epsilon import DELTA_TEXT, activation_epsilon, hidden_size_hint
from flglm.protocol import ConsentStatus, JobStatus, RoundParticipantStatus, RoundStatus, StartMode


class JobView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    model_ref: str
    task_type: str
    split_plan: dict[str, Any]
    adapter: dict[str, Any]
    hyperparameters: dict[str, Any]
    privacy: dict[str, Any]
    parallel_mode: str
    replicas: int
    rounds: int
    steps_per_round: int
    min_clients: int
    round_timeout_s: float
    straggler_policy: str
    start: StartMode
    status: JobStatus
    current_round: int
    failure_reason: str | None
    # The job's own server X25519 public key (base64; null for jobs from before per-job keys, which use the
    # deployment key), for comparing out of band; and when its private key was deleted after the job ended.
    server_public_key: str | None
    server_key_deleted_at: datetime | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    # What data owners see in their invitation: the strongest attack of the newest completed privacy audit
    # of the job's current settings (filled by GET /jobs/{id}; null in lists and when never audited).
    audited_token_recovery: float | None = None
    audited_attack: str | None = None
    # Filled by GET /jobs/{id} (null/empty in lists): what a draft or waiting job waits for, in one line
    # ("1 of 2 approved, online clients ...", "a manual start ..."), and each client's reported fatal error.
    waiting_for: str | None = None
    client_failures: dict[str, str] = Field(
        default_factory=dict, description="client name -> the fatal error its agent reported for this job"
    )

    @computed_field(  # type: ignore[prop-decorator]
        description=f"ε (δ = {DELTA_TEXT}) of one h0 vector under the job's activation noise; null when "
        "the noise is off or the model's hidden size is not known to the control plane"
    )
    @property
    def activation_epsilon(self) -> float | None:
        noise = self.privacy.get("activation_noise")
        if not isinstance(noise, int | float) or noise <= 0:
            return None
        hidden_size = hidden_size_hint(self.model_ref)
        return None if hidden_size is None else activation_epsilon(float(noise), hidden_size)


class ParticipantView(BaseModel):
    client_id: int
    client_name: str
    client_status: str
    consent: ConsentStatus
    decided_at: datetime | None


class InviteRequest(StrictModel):
    clients: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=10_000
    )


class RoundParticipantView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    client_id: int
    status: RoundParticipantStatus
    example_count: int | None
    eval_metrics: dict[str, Any] | None
    finished_at: datetime | None
    drop_reason: str | None


class RoundView(BaseModel):
    number: int
    status: RoundStatus
    started_at: datetime
    deadline_at: datetime
    closed_at: datetime | None
    close_reason: str | None
    participants: list[RoundParticipantView]
