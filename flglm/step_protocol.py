"""Step-protocol messages shared by backend, worker and agent: refs, blob keys, paths, `WorkerJobSpec`.

One training step moves four tensors per client (docs/architecture.md); each upload and each result is one
sealed envelope addressed by a `MessageRef` (job, round, step, client, direction, sequence). The same ref
names the blob in the blob store, the AEAD associated data and the HTTP path, so the three cannot disagree.

A result carries the ref of the request it answers with the result direction and the *request's* sequence
number (`MessageRef.result_ref`), so an agent knows where to long-poll the moment it has uploaded.
A retried step (after a lost worker) uses a fresh sequence number and therefore fresh keys everywhere.

Local evaluation is forward-only: `eval_activations` (h0 of an eval batch) and its `eval_result` (h1, computed
under `torch.no_grad()`, never a training step). They use the step paths with their own direction, so their
addresses, blob keys, AES keys and replay streams are separate from training messages (a training step and
an eval batch with the same index can never collide); their "step" is the eval batch's index within the
round. `EVAL_ROUND_RULE` says which round they may name.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flglm.contracts.job_settings import AdapterSpec, Hyperparameters
from flglm.protocol import ParallelMode, SplitPlanSpec, validate_public_key_b64

# Agent-facing step paths (relative to flglm.protocol.API_PREFIX). Uploads are PUT with the sealed
# envelope as the raw body (application/octet-stream); results are GET with `?wait_s=` for the long-poll.
STEP_MESSAGE_PATH = "/agent/jobs/{job_id}/rounds/{round_number}/steps/{step}/{direction}/{sequence}"
STEP_RESULT_PATH = STEP_MESSAGE_PATH + "/result"
CLIENT_ADAPTERS_PATH = "/agent/jobs/{job_id}/rounds/{round_number}/client-adapters"
MAX_LONG_POLL_S = 60.0


class MessageDirection(StrEnum):
    """Same values as `flglm.wire.directions.Direction`; repeated here so this module stays pydantic-only."""

    activations = "activations"
    activations_result = "activations_result"
    gradients = "gradients"
    gradients_result = "gradients_result"
    adapters_up = "adapters_up"
    adapters_down = "adapters_down"
    eval_activations = "eval_activations"
    eval_result = "eval_result"


RESULT_DIRECTION: dict[MessageDirection, MessageDirection] = {
    MessageDirection.activations: MessageDirection.activations_result,
    MessageDirection.gradients: MessageDirection.gradients_result,
    MessageDirection.adapters_up: MessageDirection.adapters_down,
    MessageDirection.eval_activations: MessageDirection.eval_result,
}

# An agent evaluates the FedAvg'd model of round r after reporting round r done and downloading its client
# adapters, when round r is already closed (the straggler policy must never wait on evaluation). So eval
# uploads may name the job's current round or the one before it, while the job runs or just completed.
EVAL_ROUND_RULE = "the job's current round or the round before it, while the job is running or completed"


class MessageRef(BaseModel):
    """Address of one sealed message; also its blob key and (through the envelope header) its AEAD data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: int = Field(ge=0)
    round_number: int = Field(ge=0)
    step: int = Field(ge=0)
    client_id: int = Field(ge=0)
    direction: MessageDirection
    sequence: int = Field(ge=0)

    def blob_key(self) -> str:
        return (
            f"msg:{self.job_id}:{self.round_number}:{self.step}:{self.client_id}:"
            f"{self.direction.value}:{self.sequence}"
        )

    def result_ref(self) -> MessageRef:
        """Where the answer to this upload appears (same address, result direction)."""
        if self.direction not in RESULT_DIRECTION:
            raise ValueError(f"{self.direction.value} is itself a result; it has no result")
        return self.model_copy(update={"direction": RESULT_DIRECTION[self.direction]})

    def step_key(self) -> tuple[int, int, int]:
        """(round, step, client): the training step this message belongs to, whatever its direction."""
        return (self.round_number, self.step, self.client_id)


def client_adapters_ref(job_id: int, round_number: int, client_id: int) -> MessageRef:
    """A client's adapters_up message at the end of a round (`CLIENT_ADAPTERS_PATH`).

    One upload per client and round, so its address is fixed: step 0, sequence = the round number (rounds
    grow, which keeps the per-stream replay order). Its result (`result_ref`) is the FedAvg'd adapters sealed
    for that client.
    """
    return MessageRef(
        job_id=job_id,
        round_number=round_number,
        step=0,
        client_id=client_id,
        direction=MessageDirection.adapters_up,
        sequence=round_number,
    )


class UploadOutcome(StrEnum):
    stored = "stored"
    identical = "identical"  # the same message was already uploaded: no second effect


class UploadReceipt(BaseModel):
    """Answer to a step upload (201 for stored, 200 for an identical duplicate; a conflict is a 409)."""

    message: MessageRef
    outcome: UploadOutcome
    result_path: str | None = None


class JobClient(BaseModel):
    """One client of a job as the worker needs it: its id and its enrolled X25519 public key."""

    model_config = ConfigDict(extra="forbid")

    client_id: int = Field(ge=0)
    public_key: str = Field(description="raw 32-byte X25519 public key, base64")

    @field_validator("public_key")
    @classmethod
    def _check_public_key(cls, value: str) -> str:
        return validate_public_key_b64(value)


class WorkerJobSpec(BaseModel):
    """Everything the worker needs to serve one job, so the engine never touches the job database.

    The backend writes it (JSON) to the blob store when the job starts; tasks carry only the job id.
    """

    model_config = ConfigDict(extra="forbid")

    job_id: int = Field(ge=0)
    model_ref: str = Field(min_length=1, max_length=500)
    split_plan: SplitPlanSpec = Field(default_factory=lambda: SplitPlanSpec())
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    seed: int = 0
    # The job's settings; the worker reads its optimizer and schedule (`Hyperparameters.train_config`).
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    parallel_mode: ParallelMode = ParallelMode.sequential
    replicas: int = Field(1, ge=1, le=1024)
    clients: list[JobClient] = Field(min_length=1)
    wire_dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$")
    max_batch_size: int = Field(64, ge=1)
    max_seq_len: int = Field(4096, ge=1)
    checkpoint_dir: str = Field(min_length=1)
    # The job's own server X25519 private key file (0600; written by the backend when the job opened, and
    # deleted a retention period after it ended). None: the job uses the worker's deployment key.
    server_key_file: str | None = Field(None, min_length=1)
    checkpoint_every: int = Field(10, ge=1)  # server steps between checkpoints (one more at round end)
    server_fedavg_every: int = Field(10, ge=1)  # server_hierarchical: steps between replica FedAvg
    batch_window_s: float = Field(2.0, ge=0)  # batch modes: how long a batch waits for its stragglers
    exchange_timeout_s: float = Field(120.0, gt=0)  # server_hierarchical: how long to wait for peer replicas
    inflight_timeout_s: float = Field(600.0, gt=0)  # a graph whose backward has not come by then is dropped
    max_pending: int = Field(256, ge=1)  # forwards queued behind the in-flight step, per replica
    blob_ttl_s: float = Field(6 * 3600.0, gt=0)

    @model_validator(mode="after")
    def _check_consistency(self) -> WorkerJobSpec:
        ids = [client.client_id for client in self.clients]
        if len(set(ids)) != len(ids):
            raise ValueError("clients contains duplicate client ids")
        if self.parallel_mode is not ParallelMode.server_hierarchical and self.replicas != 1:
            raise ValueError("replicas > 1 needs parallel_mode 'server_hierarchical'")
        if self.replicas > len(self.clients):
            raise ValueError(f"{self.replicas} replicas for {len(self.clients)} clients: some would idle")
        return self

    def client_ids(self) -> list[int]:
        return [client.client_id for client in self.clients]

    def replica_of(self, client_id: int) -> int:
        """Replica serving `client_id`: clients are dealt round-robin in the order the job lists them."""
        return self.client_ids().index(client_id) % self.replicas

    def replica_clients(self, replica: int) -> list[int]:
        return [cid for cid in self.client_ids() if self.replica_of(cid) == replica]

    def public_key_of(self, client_id: int) -> str:
        for client in self.clients:
            if client.client_id == client_id:
                return client.public_key
        raise KeyError(client_id)


def spec_blob_key(job_id: int) -> str:
    """Blob-store key of a job's `WorkerJobSpec` JSON."""
    return f"job:{job_id}:spec"


DEFAULT_QUEUE = "flglm.default"
# The most examples a client may claim for its FedAvg weight: far above any real data owner's, far below
# what would overflow a float sum of every client's weight.
MAX_EXAMPLE_COUNT = 10**9
REPLICA_QUEUE_PREFIX = "flglm.replica"


def replica_queue(replica: int, prefix: str = REPLICA_QUEUE_PREFIX) -> str:
    """Celery queue of server replica slot `replica` (of every job): consumed by exactly one worker process,
    which holds that replica's in-flight graphs. Stateless tasks (client FedAvg) use `DEFAULT_QUEUE`."""
    return f"{prefix}.{replica}"
