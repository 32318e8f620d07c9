"""Control-plane messages and paths shared by the backend and the client agent (pydantic only, no FastAPI)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from flglm.contracts.job_settings import AdapterSpec, Hyperparameters
from flglm.contracts.model_refs import check_model_ref
from flglm.contracts.request_model import StrictModel
from flglm.contracts.validation_errors import FieldProblem
from flglm.wire.keys import public_key_from_b64

API_PREFIX = "/api/v1"
# Agents send their protocol version in this header; the backend answers 426 to one it does not speak.
PROTOCOL_HEADER = "X-FLGLM-Protocol"
PROTOCOL_VERSION = "1"

# Agent-facing paths (relative to API_PREFIX); the agent formats them with the same names.
ENROLL_PATH = "/agent/enroll"
HEARTBEAT_PATH = "/agent/heartbeat"
INVITATIONS_PATH = "/agent/invitations"
INVITATION_DECISION_PATH = "/agent/invitations/{job_id}/decision"
WORK_PATH = "/agent/work"
MAX_WORK_WAIT_S = 60.0  # `GET /agent/work?wait_s=`: the longest a work long-poll is held
# What `flglm agent run` does by default (its `RunOptions`; the load benchmark's agents do the same): a
# heartbeat every AGENT_HEARTBEAT_S; with no round to work on, a work long-poll of AGENT_WORK_WAIT_S, then a
# pause of AGENT_POLL_S before the next.
AGENT_HEARTBEAT_S = 15.0
AGENT_WORK_WAIT_S = 25.0
AGENT_POLL_S = 2.0
AGENT_JOB_PATH = "/agent/jobs/{job_id}"
ROUND_DONE_PATH = "/agent/jobs/{job_id}/rounds/{round_number}/done"
STEP_METRICS_PATH = "/agent/jobs/{job_id}/metrics"
AGENT_FAILURE_PATH = "/agent/jobs/{job_id}/failure"


class JobStatus(enum.StrEnum):
    draft = "draft"
    waiting_for_clients = "waiting_for_clients"
    running = "running"
    paused = "paused"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


class ParallelMode(enum.StrEnum):
    sequential = "sequential"
    client_batch = "client_batch"
    server_hierarchical = "server_hierarchical"


class TaskType(enum.StrEnum):
    generation = "generation"
    classification = "classification"


class StragglerPolicy(enum.StrEnum):
    """What a round does at its deadline: drop unfinished clients (if ≥ min_clients finished) or fail."""

    drop = "drop"
    fail = "fail"


class StartMode(enum.StrEnum):
    """How a waiting job starts: by itself once `min_clients` approved clients are online, or by hand."""

    auto = "auto"
    manual = "manual"


class ConsentStatus(enum.StrEnum):
    invited = "invited"
    approved = "approved"
    declined = "declined"


class ClientStatus(enum.StrEnum):
    pending = "pending"  # enrollment token issued, agent not registered yet
    active = "active"
    offline = "offline"
    revoked = "revoked"


class RoundStatus(enum.StrEnum):
    open = "open"
    closed = "closed"
    failed = "failed"


class RoundParticipantStatus(enum.StrEnum):
    active = "active"
    finished = "finished"
    dropped = "dropped"


class ConsentDecision(enum.StrEnum):
    approve = "approve"
    decline = "decline"


def validate_public_key_b64(value: str) -> str:
    """Check that `value` is base64 of a raw 32-byte X25519 public key; returns it unchanged.

    `KeyFormatError` is a ValueError, so pydantic reports it as a validation error naming the field.
    """
    public_key_from_b64(value)
    return value


# The largest id, round, step or count the job store holds (PostgreSQL INTEGER); sizes use BIGINT's half.
MAX_DB_INT = 2**31 - 1
MAX_DB_BIGINT = 2**62
MAX_SEQUENCE = 2**63 - 1  # a message's sequence number: the replay guards compare it as 20 digits
MAX_METRIC_KEYS = 64  # phase timings or eval metrics one report may carry


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: list[FieldProblem] | None = Field(
        default=None, description="validation errors (422) one by one: field, allowed values, did you mean"
    )


class ErrorBody(BaseModel):
    """Every error response of the API has this shape."""

    error: ErrorDetail


class SplitPlanSpec(StrictModel):
    front_layers: int = Field(default=1, ge=1, le=1000)
    back_layers: int = Field(default=1, ge=1, le=1000)


class PrivacySpec(StrictModel):
    """What the data owner's agent does to every tensor before it leaves (see `flglm.privacy.defences`)."""

    wire_dtype: str = Field(default="float32", pattern="^(float32|float16|bfloat16)$")
    activation_noise: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        allow_inf_nan=False,
        description="Gaussian noise on h0 after clipping: noise vector norm ≈ this × the clip norm",
    )
    activation_clip: float = Field(
        default=1.0,
        gt=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="per-token L2 clip of h0, × the public input block's median output norm",
    )
    gradient_noise: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        allow_inf_nan=False,
        description="Gaussian noise on dL/dh1: std per coordinate = this × the tensor's RMS",
    )
    private_front: bool = Field(
        default=False,
        description="input-block adapters from a private seed, never uploaded, never averaged",
    )
    private_init_scale: float = Field(
        default=0.0,
        ge=0.0,
        le=10.0,
        allow_inf_nan=False,
        description="private_front only: adapted input-block weights start this × ‖W‖ from public",
    )
    decorrelation: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="private_front only: NoPeek weight of distance correlation between embeddings and h0",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "activation_noise_std" in data:
            raise ValueError(
                "privacy.activation_noise_std was never applied and is gone: use activation_noise "
                "(noise-to-clip ratio) with activation_clip"
            )
        return data

    @model_validator(mode="after")
    def _private_only(self) -> PrivacySpec:
        if not self.private_front and (self.private_init_scale > 0 or self.decorrelation > 0):
            raise ValueError("private_init_scale and decorrelation need private_front: true")
        return self


class JobSpec(StrictModel):
    """What an operator submits (`flglm job submit FILE`); the backend validates the same model."""

    name: str = Field(min_length=1, max_length=200)
    model_ref: str = Field(min_length=1, max_length=500)
    task_type: TaskType = TaskType.generation
    split_plan: SplitPlanSpec = Field(default_factory=lambda: SplitPlanSpec())
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    parallel_mode: ParallelMode = ParallelMode.sequential
    replicas: int = Field(default=1, ge=1, le=1024)
    rounds: int = Field(default=1, ge=1, le=100_000)
    steps_per_round: int = Field(default=1, ge=1, le=10_000_000)
    min_clients: int = Field(default=1, ge=1, le=100_000)
    round_timeout_s: float = Field(default=3600.0, gt=0, le=30 * 86_400)
    straggler_policy: StragglerPolicy = StragglerPolicy.drop
    start: StartMode = Field(
        default=StartMode.auto,
        description="auto: the job starts by itself once min_clients approved clients are online; "
        "manual: it waits for the operator's start (`flglm job start ID`)",
    )
    privacy: PrivacySpec = Field(default_factory=lambda: PrivacySpec())
    clients: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=10_000, description="names of the invited client agents"
    )

    @field_validator("model_ref")
    @classmethod
    def _check_model_ref(cls, ref: str) -> str:
        return check_model_ref(ref)

    @model_validator(mode="after")
    def _check_consistency(self) -> JobSpec:
        if self.parallel_mode is not ParallelMode.server_hierarchical and self.replicas != 1:
            raise ValueError("replicas > 1 needs parallel_mode 'server_hierarchical'")
        if len(set(self.clients)) != len(self.clients):
            raise ValueError("clients contains duplicate names")
        return self


class EnrollRequest(StrictModel):
    token: str = Field(min_length=1, max_length=200)
    public_key: str = Field(max_length=64, description="raw 32-byte X25519 public key, base64")
    example_count: int = Field(
        default=0, ge=0, le=10**9, description="how many examples this data owner chooses to disclose"
    )

    @field_validator("public_key")
    @classmethod
    def _check_public_key(cls, value: str) -> str:
        return validate_public_key_b64(value)


class EnrollResponse(BaseModel):
    client_id: int
    name: str
    credential: str = Field(description="bearer token for every later request; shown once")
    server_public_key: str


class HeartbeatRequest(StrictModel):
    example_count: int | None = Field(default=None, ge=0, le=10**9)


class HeartbeatResponse(BaseModel):
    client_id: int
    status: ClientStatus
    lease_s: float
    server_time: datetime


class InvitationView(BaseModel):
    """What a data owner sees of a job it is invited to, to decide whether to join."""

    job_id: int
    name: str
    model_ref: str
    task_type: TaskType
    parallel_mode: ParallelMode
    rounds: int
    steps_per_round: int
    hyperparameters: dict[str, Any]
    privacy: dict[str, Any]
    split_plan: dict[str, Any] = Field(
        default_factory=dict, description="front_layers: how many blocks the data owner's input block holds"
    )
    job_status: JobStatus
    consent: ConsentStatus
    audited_token_recovery: float | None = Field(
        default=None,
        description="share of training tokens the strongest audited attack recovered from what the server "
        "receives under this job's settings; None when these settings were never audited",
    )
    audited_attack: str | None = None


class ConsentRequest(StrictModel):
    decision: ConsentDecision


class AgentJobView(InvitationView):
    split_plan: dict[str, Any]
    adapter: dict[str, Any]
    current_round: int
    server_public_key: str


class WorkAssignment(BaseModel):
    """One open round this agent takes part in (only for jobs it approved and that are running)."""

    job_id: int
    round_number: int
    steps: int
    deadline_at: datetime
    job: AgentJobView


class WorkResponse(BaseModel):
    assignments: list[WorkAssignment]


class RoundDoneRequest(StrictModel):
    example_count: int = Field(ge=0, le=10**9)
    eval_metrics: dict[Annotated[str, Field(max_length=64)], float] = Field(
        default_factory=dict, max_length=MAX_METRIC_KEYS
    )


class RoundDoneResponse(BaseModel):
    job_id: int
    round_number: int
    round_status: RoundStatus
    job_status: JobStatus


MAX_FAILURE_REASON_CHARS = 1000


class AgentFailureRequest(StrictModel):
    """An agent's fatal error on a job (model not loadable, data not fitting): no data, only the reason."""

    reason: str = Field(min_length=1, max_length=MAX_FAILURE_REASON_CHARS)

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str) -> str:
        cleaned = " ".join("".join(c if c.isprintable() else " " for c in value).split())
        if not cleaned:
            raise ValueError("reason must contain printable text")
        return cleaned


class AgentFailureResponse(BaseModel):
    job_id: int
    job_status: JobStatus
    outcome: str = Field(
        description="job_failed (straggler_policy fail, or too few clients left) or "
        "client_dropped (the job goes on without this client)"
    )


class StepMetricIn(StrictModel):
    round_number: int = Field(ge=1, le=MAX_DB_INT)
    step: int = Field(ge=0, le=MAX_DB_INT)
    loss: float | None = Field(default=None, ge=-1e9, le=1e9)
    tokens: int = Field(default=0, ge=0, le=MAX_DB_BIGINT)
    phase_timings_s: dict[Annotated[str, Field(max_length=64)], Annotated[float, Field(ge=0, le=1e7)]] = (
        Field(default_factory=dict, max_length=MAX_METRIC_KEYS)
    )
    wire_bytes_up: int = Field(default=0, ge=0, le=MAX_DB_BIGINT)
    wire_bytes_down: int = Field(default=0, ge=0, le=MAX_DB_BIGINT)


class StepMetricView(StepMetricIn):
    id: int
    job_id: int
    client_id: int
    created_at: datetime
