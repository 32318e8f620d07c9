"""Task names, step-message routing and the refusal format: the torch-free half of `worker.executor`.

The backend imports this module (never `worker.executor`, which loads the engine and torch) to queue step
tasks on Celery and to turn a task's JSON refusal back into the typed `StepRejected` it was.
"""

from __future__ import annotations

from typing import Any

from flglm.step_protocol import MessageDirection, MessageRef, WorkerJobSpec, replica_queue
from worker import errors

SERVER_FORWARD = "flglm.server_forward"
SERVER_BACKWARD = "flglm.server_backward"
SERVER_EVAL_FORWARD = "flglm.server_eval_forward"
REPLICA_FLUSH = "flglm.replica_flush"
ROUND_END = "flglm.round_end"
CLIENT_FEDAVG = "flglm.client_fedavg"
REPLICA_COUNTERS = "flglm.replica_counters"
RELEASE_JOB = "flglm.release_job"  # a job ended: drop its replica from the memory of the queue's worker
ADMIT_UPLOAD = "flglm.admit_upload"
# Generation sessions (worker.generation): all on replica_queue(0), whose one process holds the KV caches.
BODY_GENERATE_OPEN = "flglm.body_generate_open"
BODY_GENERATE = "flglm.body_generate"
BODY_GENERATE_CLOSE = "flglm.body_generate_close"
# Privacy audits (worker.privacy_audit): minutes of torch, on their own queue (`flglm worker
# --no-privacy-queue` keeps them off a worker; in process they get their own lane: no replica lane waits).
PRIVACY_AUDIT = "flglm.privacy_audit"
PRIVACY_QUEUE = "flglm.privacy"

_REJECTION_KINDS: list[type[errors.StepRejected]] = [
    errors.StepRejected,
    *errors.StepRejected.__subclasses__(),
]
REJECTIONS: dict[str, type[errors.StepRejected]] = {kind.code: kind for kind in _REJECTION_KINDS}


def rejection_result(exc: errors.StepRejected) -> dict[str, Any]:
    """The JSON result of a refused task (never a retry: the input is at fault)."""
    return {"status": "rejected", "code": exc.code, "http_status": exc.http_status, "message": str(exc)}


def raise_if_rejected(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("status") == "rejected":
        raise REJECTIONS.get(str(result.get("code")), errors.StepRejected)(str(result.get("message")))
    return result


def route_step_message(spec: WorkerJobSpec, ref: MessageRef) -> tuple[str, dict[str, Any], str]:
    """(task name, kwargs, queue) for an uploaded forward, gradient or eval forward message; all go to the
    replica queue (the eval forward needs that replica's current server adapters)."""
    if ref.client_id not in spec.client_ids():
        raise errors.ForeignClient(f"client {ref.client_id} is not a client of job {spec.job_id}")
    replica = spec.replica_of(ref.client_id)
    names = {
        MessageDirection.activations: SERVER_FORWARD,
        MessageDirection.gradients: SERVER_BACKWARD,
        MessageDirection.eval_activations: SERVER_EVAL_FORWARD,
    }
    if ref.direction not in names:
        raise errors.ReplicaMisrouted(f"{ref.direction.value} messages are not server step tasks")
    kwargs = {"job_id": spec.job_id, "replica": replica, "message": ref.model_dump(mode="json")}
    return names[ref.direction], kwargs, replica_queue(replica)
