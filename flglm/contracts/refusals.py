"""The one catalogue of step refusals: a class per code, each with the HTTP status the backend answers with.

The worker raises them, the backend maps them to HTTP (`backend.errors.refusal`), the agent compares the
`code` of an error body with `Kind.code` (never a string written again).
"""

from __future__ import annotations


class StepRejected(ValueError):
    """A step message the engine refuses; nothing was stored and no state changed."""

    http_status: int = 400
    code: str = "step_rejected"


class UnknownJob(StepRejected):
    """No `WorkerJobSpec` is published for this job id."""

    http_status = 404
    code = "unknown_job"


class ForeignClient(StepRejected):
    """The client is not in the job, or is served by another replica."""

    http_status = 403
    code = "foreign_client"


class MissingMessage(StepRejected):
    """The referenced upload is not in the blob store (never uploaded, or expired)."""

    http_status = 404
    code = "missing_message"


class UploadNotFound(StepRejected):
    """A result was asked of an upload the blob store does not hold (never uploaded, expired, or lost when
    Redis restarted without persistence): the agent uploads again (a step: retried from its forward)."""

    http_status = 404
    code = "upload_not_found"


class TamperedMessage(StepRejected):
    """The envelope failed authentication, or its header names another message."""

    http_status = 400
    code = "tampered_message"


class ReplayedMessage(StepRejected):
    """A sequence number not above the last accepted one of its (job, client, direction) stream."""

    http_status = 409
    code = "replayed_message"


class WrongTensor(StepRejected):
    """Well-formed but wrong for the job: dtype, shape, hidden size, batch or sequence limits."""

    http_status = 422
    code = "wrong_tensor"


class JobKeyDeleted(StepRejected):
    """The job's server private key file was deleted (its retention after the job ended ran out): none of
    its messages can be opened or sealed any more, by design (forward secrecy)."""

    http_status = 410
    code = "job_key_deleted"


class StepGraphMissing(StepRejected):
    """A gradient for a step whose forward graph is not held here (evicted, lost with a worker, or never
    run): the agent retries the step from the forward with a fresh sequence number."""

    http_status = 409
    code = "step_graph_missing"


class ConflictingDuplicate(StepRejected):
    """Different bytes at an address that already holds a message: a retried step needs a new sequence."""

    http_status = 409
    code = "conflicting_duplicate"


class WrongDirection(StepRejected):
    """Agents upload activations, gradients, adapters_up and eval_activations only; results are the
    server's to write."""

    http_status = 400
    code = "wrong_direction"


class SpecConflict(StepRejected):
    """A job already has another worker spec published: a job's spec never changes under its replicas."""

    http_status = 409
    code = "spec_conflict"


class ReplicaMisrouted(StepRejected):
    """The task reached a worker that does not serve this replica (a routing bug, never the client's)."""

    http_status = 500
    code = "replica_misrouted"


class ReplicaBusy(StepRejected):
    """Too many forwards queued behind the in-flight step; the agent retries later."""

    http_status = 503
    code = "replica_busy"


class UnknownGenerationSession(StepRejected):
    """A body call or close for a generation session this worker does not hold: never opened, closed,
    idle past its TTL, evicted by newer sessions, or lost with its worker. The caller opens a new one."""

    http_status = 404
    code = "unknown_generation_session"


class GenerationOutOfOrder(StepRejected):
    """A body call whose attention mask does not continue the session's KV cache (a repeated, lost or
    concurrent call, or another batch): the cache would no longer match the caller's."""

    http_status = 409
    code = "generation_out_of_order"


class NoServerCheckpoint(StepRejected):
    """A generation session asked for a job whose server adapters were never checkpointed."""

    http_status = 409
    code = "no_server_checkpoint"


class JournalGap(RuntimeError):
    """A journalled step cannot be replayed (its messages expired): resuming would lose applied steps."""
