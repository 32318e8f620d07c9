"""Task names and queues, step-message routing and the JSON format of a refused task.

The backend queues tasks by these names (never importing `worker.executor`, which loads the engine and
torch); the worker registers its functions under them; a task's JSON refusal turns back into the typed
`StepRejected` it was on the caller's side.
"""

from __future__ import annotations

from typing import Any

from flglm.contracts import refusals
from flglm.step_protocol import DEFAULT_QUEUE as DEFAULT_QUEUE  # every queue name is importable from here
from flglm.step_protocol import MessageDirection, MessageRef, WorkerJobSpec, replica_queue

SERVER_FORWARD = "flglm.server_forward"
SERVER_BACKWARD = "flglm.server_backward"
SERVER_EVAL_FORWARD = "flglm.server_eval_forward"
REPLICA_FLUSH = "flglm.replica_flush"
ROUND_END = "flglm.round_end"
CLIENT_FEDAVG = "flglm.client_fedavg"
REPLICA_COUNTERS = "flglm.replica_counters"
RELEASE_JOB = "flglm.release_job"  # a job ended: drop its replica from the memory of the queue's worker
DROP_CLIENT = "flglm.drop_client"  # a client was dropped from its round: the replica stops waiting for it
ADMIT_UPLOAD = "flglm.admit_upload"
# Upload admission has its own queue: on `flglm.default` (which the replica-0 solo worker also consumes) an
# admission could wait behind a forward pass and time out. Every `flglm worker` consumes it unless told not.
ADMISSION_QUEUE = "flglm.admission"
# Generation sessions (worker.generation): all on replica_queue(0), whose one process holds the KV caches.
BODY_GENERATE_OPEN = "flglm.body_generate_open"
BODY_GENERATE = "flglm.body_generate"
BODY_GENERATE_CLOSE = "flglm.body_generate_close"
# Privacy audits (worker.privacy_audit): minutes of torch, on their own queue (`flglm worker
# --no-privacy-queue` keeps them off a worker; in process they get their own lane: no replica lane waits).
PRIVACY_AUDIT = "flglm.privacy_audit"
PRIVACY_QUEUE = "flglm.privacy"

_REJECTION_KINDS: list[type[refusals.StepRejected]] = [
    refusals.StepRejected,
    *refusals.StepRejected.__subclasses__(),
]
REJECTIONS: dict[str, type[refusals.StepRejected]] = {kind.code: kind for kind in _REJECTION_KINDS}


def rejection_result(exc: refusals.StepRejected) -> dict[str, Any]:
    """The JSON result of a refused task (never a retry: the input is at fault)."""
    return {"status": "rejected", "code": exc.code, "http_status": exc.http_status, "message": str(exc)}


def raise_if_rejected(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("status") == "rejected":
        raise REJECTIONS.get(str(result.get("code")), refusals.StepRejected)(str(result.get("message")))
    return result


def route_step_message(spec: WorkerJobSpec, ref: MessageRef) -> tuple[str, dict[str, Any], str]:
    """(task name, kwargs, queue) for an uploaded forward, gradient or eval forward message; all go to the
    replica queue (the eval forward needs that replica's current server adapters)."""
    if ref.client_id not in spec.client_ids():
        raise refusals.ForeignClient(f"client {ref.client_id} is not a client of job {spec.job_id}")
    replica = spec.replica_of(ref.client_id)
    names = {
        MessageDirection.activations: SERVER_FORWARD,
        MessageDirection.gradients: SERVER_BACKWARD,
        MessageDirection.eval_activations: SERVER_EVAL_FORWARD,
    }
    if ref.direction not in names:
        raise refusals.ReplicaMisrouted(f"{ref.direction.value} messages are not server step tasks")
    kwargs = {"job_id": spec.job_id, "replica": replica, "message": ref.model_dump(mode="json")}
    return names[ref.direction], kwargs, replica_queue(replica)
