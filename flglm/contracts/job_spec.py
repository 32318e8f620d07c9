"""Publishing and reading a job's `WorkerJobSpec` in the blob store: the write-once record workers serve."""

from __future__ import annotations

import functools

from flglm.contracts.blob_store import BlobStore, PutOutcome
from flglm.contracts.refusals import SpecConflict, UnknownJob
from flglm.step_protocol import WorkerJobSpec, spec_blob_key

MIN_SPEC_TTL_S = 30 * 86400.0  # a spec outlives its job's blobs: late eval forwards and exports read it


def publish_job_spec(store: BlobStore, spec: WorkerJobSpec) -> PutOutcome:
    """Make a job known to the workers (the backend does this once the job's start is committed).

    Write-once: publishing the same spec again is harmless (`identical`); another spec for the same job is
    refused with `SpecConflict`, since a job's spec never changes under a running replica."""
    data = spec.model_dump_json().encode()
    outcome = store.put_if_absent(spec_blob_key(spec.job_id), data, max(spec.blob_ttl_s, MIN_SPEC_TTL_S))
    if outcome is PutOutcome.conflict:
        raise SpecConflict(f"job {spec.job_id} already has another worker spec published")
    return outcome


def read_job_spec(store: BlobStore, job_id: int) -> WorkerJobSpec:
    """The published spec of `job_id`; `UnknownJob` when none is (the job never started here)."""
    data = store.get(spec_blob_key(job_id))
    if data is None:
        raise UnknownJob(f"job {job_id} is not known to the workers (no published spec)")
    return _parsed_spec(bytes(data))


@functools.lru_cache(maxsize=256)
def _parsed_spec(data: bytes) -> WorkerJobSpec:
    """Parsing checks every client's X25519 key (an exchange each): with 200 clients ~10 ms, which every
    upload paid; a spec is write-once, so the same bytes parse once (treat the result as read-only)."""
    return WorkerJobSpec.model_validate_json(data)
