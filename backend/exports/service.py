"""Bundle a job's newest server adapters and global client adapters into one safetensors file (torch-free).

Tensors: `body/<server body param>` from replica 0's newest checkpoint (replicas are averaged at round
end) and `client/<front.… | back.…>` from the newest plaintext FedAvg result (see
`flglm.contracts.artifacts`). Metadata: the job's model ref, split plan and adapter config as JSON, so the CLI
can rebuild the unsplit PEFT adapter with `flglm.export` without asking anything else.

A job with a private input block (`privacy.private_front`) has no global input-block adapters: each data
owner keeps its own. Its bundle says so in its metadata (`private_front`, `note`) and its adapter config
lists only the shared parts, so everything that loads it builds the *public* input block.

The bundle is also the caller's half of split generation: the backend's generate route and `flglm generate`
load its client adapters into the front and back, while the body runs on a worker from the same server
checkpoint (see `backend.exports.sessions`).
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from backend.audit.service import record
from backend.errors import Conflict
from backend.jobs.service import get_job
from backend.settings import Settings
from flglm.contracts.artifacts import (
    latest_client_adapters,
    latest_server_checkpoint,
    read_raw_safetensors,
    write_raw_safetensors,
)

BUNDLE_FORMAT = "flglm-export/1"
ADAPTER_PARTS = ("front", "body", "back")  # flglm.split.PART_NAMES, named here without importing torch
PRIVATE_FRONT_NOTE = (
    "private_front job: the input-block (front) adapters stay with each data owner and are not in this "
    "bundle; it holds the public input block with the averaged output-block and server adapters"
)


class NothingToExport(Conflict):
    """The job has not checkpointed its adapters yet (no round finished on this deployment)."""


def job_checkpoint_dir(settings: Settings, job_id: int) -> str:
    # The same directory `backend.steps.service` publishes to the workers in the job's spec.
    return str(settings.resolved_checkpoint_dir() / f"job-{job_id}")


def export_bundle(session: Session, settings: Settings, actor: str, job_id: int) -> bytes:
    """The bundle's bytes; audited, because it hands the averaged client adapters to the operator."""
    bundle, metadata = build_bundle(session, settings, job_id)
    detail = {"server": metadata["server_checkpoint"], "client": metadata["client_adapters"]}
    record(session, actor, "job.export", "job", job_id, detail)
    return bundle


def build_bundle(session: Session, settings: Settings, job_id: int) -> tuple[bytes, dict[str, str]]:
    """The bundle of the job's newest adapters and its metadata; NothingToExport before the first round."""
    job = get_job(session, job_id)
    directory = job_checkpoint_dir(settings, job.id)
    server = latest_server_checkpoint(directory, replica=0)
    client = latest_client_adapters(directory)
    if server is None or client is None:
        missing = "server adapter checkpoint" if server is None else "global client adapters"
        raise NothingToExport(f"job {job.id} has no {missing} yet: export after its first round has ended")
    tensors = {f"body/{name}": t for name, t in read_raw_safetensors(server, "adapter/").items()}
    tensors |= {f"client/{name}": t for name, t in read_raw_safetensors(client).items()}
    adapter = dict(job.adapter)
    private_front = bool(job.privacy.get("private_front", False))
    if private_front:
        adapter["parts"] = [part for part in adapter.get("parts", ADAPTER_PARTS) if part != "front"]
    metadata = {
        "format": BUNDLE_FORMAT,
        "job_id": str(job.id),
        "model_ref": job.model_ref,
        "split_plan": json.dumps(job.split_plan),
        "adapter": json.dumps(adapter),
        "server_checkpoint": server.name,
        "client_adapters": client.name,
        "private_front": json.dumps(private_front),
    }
    if private_front:
        metadata["note"] = PRIVATE_FRONT_NOTE
    return write_raw_safetensors(tensors, metadata), metadata
