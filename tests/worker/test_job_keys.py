"""Workers use each job's own server key (named by its spec): another job's fails, a deleted one refuses."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from flglm.contracts import refusals as errors
from flglm.contracts.blob_store import InMemoryBlobStore
from flglm.contracts.job_spec import publish_job_spec
from flglm.contracts.tasks import ADMIT_UPLOAD, DEFAULT_QUEUE
from flglm.step_messages import seal_activations
from flglm.step_protocol import MessageDirection, MessageRef, WorkerJobSpec
from flglm.wire.errors import InsecureKeyFileError
from flglm.wire.keys import ClientKeyPair, derive_channel_keys, generate_private_key, save_private_key
from tests.support.step_clients import HIDDEN, make_spec
from worker.executor import InProcessExecutor

CLIENT_ID = 11
SEQUENCE = itertools.count(1)


def _job(tmp_path: Path, job_id: int, client: ClientKeyPair) -> tuple[WorkerJobSpec, X25519PublicKey]:
    key = generate_private_key()
    key_file = tmp_path / "job-keys" / f"job-{job_id}.key"
    key_file.parent.mkdir(mode=0o700, exist_ok=True)
    save_private_key(key, key_file, replace=False)
    spec = make_spec(
        job_id, [(CLIENT_ID, client)], tmp_path / f"ckpt-{job_id}", server_key_file=str(key_file)
    )
    return spec, key.public_key()


def _sealed(client: ClientKeyPair, server_public: X25519PublicKey, ref: MessageRef) -> bytes:
    """h0 sealed by the client for `server_public` and the address `ref`."""
    keys = derive_channel_keys(client.private_key, server_public, str(ref.job_id), str(CLIENT_ID))
    h0 = torch.randn(1, 4, HIDDEN)  # (batch, seq, hidden)
    return bytes(seal_activations(keys, ref, h0, torch.ones(1, 4, dtype=torch.long), torch.float32))


def _ref(spec: WorkerJobSpec) -> MessageRef:
    return MessageRef(
        job_id=spec.job_id,
        round_number=1,
        step=0,
        client_id=CLIENT_ID,
        direction=MessageDirection.activations,
        sequence=next(SEQUENCE),
    )


def test_each_job_opens_only_what_was_sealed_for_its_own_key(tmp_path: Path) -> None:
    client = ClientKeyPair.generate()
    spec_a, public_a = _job(tmp_path, 5, client)
    spec_b, public_b = _job(tmp_path, 6, client)
    deployment_key = generate_private_key()
    store = InMemoryBlobStore()
    for spec in (spec_a, spec_b):
        publish_job_spec(store, spec)
    executor = InProcessExecutor(store, deployment_key)

    def admit(spec: WorkerJobSpec, sealed_for: X25519PublicKey) -> dict[str, object]:
        ref = _ref(spec)
        staging = f"staging:{ref.blob_key()}"
        store.put_if_absent(staging, _sealed(client, sealed_for, ref), 30)
        kwargs = {"job_id": spec.job_id, "message": ref.model_dump(mode="json"), "staging_key": staging}
        return executor.submit(ADMIT_UPLOAD, kwargs, DEFAULT_QUEUE).get(timeout_s=30)

    try:
        assert admit(spec_a, public_a) == {"status": "admitted"}
        with pytest.raises(errors.TamperedMessage):  # sealed for job A's key, opened under job B's
            admit(spec_b, public_a)
        with pytest.raises(errors.TamperedMessage):  # the deployment key no longer opens a keyed job
            admit(spec_b, deployment_key.public_key())
        assert admit(spec_b, public_b) == {"status": "admitted"}

        os.unlink(spec_a.server_key_file or "")  # the backend's retention deleted job A's key
        with pytest.raises(errors.JobKeyDeleted) as deleted:  # a clear refusal, though the key was cached
            admit(spec_a, public_a)
        assert deleted.value.http_status == 410
        assert admit(spec_b, public_b) == {"status": "admitted"}  # the worker goes on serving job B
    finally:
        executor.close()


def test_the_runtime_caches_a_jobs_key_refuses_loose_files_and_drops_a_deleted_jobs_replica(
    tmp_path: Path,
) -> None:
    client = ClientKeyPair.generate()
    spec, _ = _job(tmp_path, 7, client)
    store = InMemoryBlobStore()
    publish_job_spec(store, spec)
    executor = InProcessExecutor(store, generate_private_key())
    runtime = executor.runtime
    try:
        assert runtime.server_key_for(spec) is runtime.server_key_for(spec)  # loaded once per job
        unkeyed = spec.model_copy(update={"server_key_file": None})
        assert runtime.server_key_for(unkeyed) is runtime.server_private_key

        replica = runtime.replica(spec.job_id, 0)
        assert runtime.held(spec.job_id, 0) is replica
        os.unlink(spec.server_key_file or "")
        with pytest.raises(errors.JobKeyDeleted):
            runtime.replica(spec.job_id, 0)
        assert runtime.held(spec.job_id, 0) is None  # nothing of the job stays in memory

        loose, _ = _job(tmp_path, 8, client)
        os.chmod(loose.server_key_file or "", 0o644)
        with pytest.raises(InsecureKeyFileError):
            runtime.server_key_for(loose)
    finally:
        executor.close()
