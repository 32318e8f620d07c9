"""Upload admission (what the backend checks before storing a step message): typed 4xx refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flglm.contracts import refusals as errors
from flglm.contracts.refusals import WrongDirection
from flglm.step_messages import seal_activations, seal_hidden
from flglm.step_protocol import MessageDirection
from flglm.wire.errors import ReplayError
from flglm.wire.keys import ClientKeyPair, generate_private_key
from flglm.wire.sequence import ReplayGuard
from tests.support.step_clients import SimulatedClient, make_spec
from worker.admission import admit_step_upload


def test_admission_refuses_hostile_uploads_with_their_status(tmp_path: Path) -> None:
    server_key = generate_private_key()
    client = SimulatedClient(11, ClientKeyPair.generate())
    spec = make_spec(3, [(11, client.keypair)], tmp_path)
    keys = client.keys(spec, server_key.public_key())
    guard = ReplayGuard()
    h0, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)

    def admit(ref: object, blob: bytes) -> None:
        admit_step_upload(spec, server_key, ref, blob, guard)  # type: ignore[arg-type]

    ref = client.ref(spec, 1, 0, MessageDirection.activations)
    admit(ref, seal_activations(keys, ref, h0, mask, torch.float32))  # a valid upload passes

    cases: list[tuple[type[errors.StepRejected], int]] = []
    ref = client.ref(spec, 1, 0, MessageDirection.activations)
    with pytest.raises(errors.WrongTensor) as wrong_dtype:
        admit(ref, seal_activations(keys, ref, h0, mask, torch.float16))
    cases.append((type(wrong_dtype.value), wrong_dtype.value.http_status))
    ref = client.ref(spec, 1, 0, MessageDirection.gradients)
    with pytest.raises(errors.WrongTensor, match="expected"):
        admit(ref, seal_hidden(keys, ref, torch.randn(2, 5, 8), torch.float32))
    ref = client.ref(spec, 1, 0, MessageDirection.activations)
    tampered = bytearray(seal_activations(keys, ref, h0, mask, torch.float32))
    tampered[-1] ^= 0x80
    with pytest.raises(errors.TamperedMessage) as bad_tag:
        admit(ref, bytes(tampered))
    cases.append((type(bad_tag.value), bad_tag.value.http_status))
    with pytest.raises(errors.ForeignClient) as foreign:
        admit(ref.model_copy(update={"client_id": 12}), seal_activations(keys, ref, h0, mask, torch.float32))
    cases.append((type(foreign.value), foreign.value.http_status))
    with pytest.raises(WrongDirection):
        result = ref.result_ref()
        admit(result, seal_hidden(keys, result, h0, torch.float32))
    old = client.ref(spec, 1, 0, MessageDirection.activations).model_copy(update={"sequence": 1})
    with pytest.raises(errors.ReplayedMessage) as replayed:
        admit(old, seal_activations(keys, old, h0, mask, torch.float32))
    cases.append((type(replayed.value), replayed.value.http_status))
    assert [status for _, status in cases] == [422, 400, 403, 409]


def test_redis_sequence_guard_is_shared_and_strictly_increasing(redis_url: str) -> None:
    import uuid

    import redis

    from flglm.step_messages import header_for
    from flglm.step_protocol import MessageRef
    from worker.admission import RedisSequenceGuard

    client = redis.Redis.from_url(redis_url)
    namespace = f"test-seq-{uuid.uuid4().hex}:"
    first, second = RedisSequenceGuard(client, namespace), RedisSequenceGuard(client, namespace)
    ref = MessageRef(
        job_id=1,
        round_number=1,
        step=0,
        client_id=5,
        direction=MessageDirection.activations,
        sequence=2**60 + 1,
    )
    first.accept(header_for(ref))
    with pytest.raises(ReplayError):
        second.accept(header_for(ref))  # the other process sees it
    digested = ref.model_copy(update={"sequence": 2**60 + 5})
    first.accept(header_for(digested), digest="aa" * 32)
    second.accept(header_for(digested), digest="aa" * 32)  # an identical retry, in another process
    with pytest.raises(ReplayError):
        second.accept(header_for(digested), digest="bb" * 32)  # the same sequence, another message
    with pytest.raises(ReplayError):
        second.accept(header_for(digested))  # no digest: no identical retry either
    with pytest.raises(ReplayError):
        second.accept(header_for(ref.model_copy(update={"sequence": 2**60})))
    with pytest.raises(ReplayError):
        second.accept(header_for(ref.model_copy(update={"sequence": 2**60 + 2})))  # below the last: 2**60 + 5
    second.accept(header_for(ref.model_copy(update={"sequence": 2**60 + 6})))  # above 2**53: exact
    first.accept(header_for(ref.model_copy(update={"direction": MessageDirection.gradients})))  # own stream
    client.close()


def test_admit_upload_task_checks_a_staged_upload(tmp_path: Path) -> None:
    from flglm.contracts.blob_store import InMemoryBlobStore
    from flglm.contracts.job_spec import publish_job_spec
    from flglm.contracts.tasks import ADMIT_UPLOAD, DEFAULT_QUEUE
    from worker.executor import InProcessExecutor

    server_key = generate_private_key()
    client = SimulatedClient(11, ClientKeyPair.generate())
    spec = make_spec(4, [(11, client.keypair)], tmp_path)
    store = InMemoryBlobStore()
    publish_job_spec(store, spec)
    executor = InProcessExecutor(store, server_key)
    keys = client.keys(spec, server_key.public_key())
    try:
        ref = client.ref(spec, 1, 0, MessageDirection.activations)
        sealed = seal_activations(
            keys, ref, torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.long), torch.float32
        )
        store.put_if_absent("staging:a", sealed, 30)
        kwargs = {"job_id": 4, "message": ref.model_dump(mode="json"), "staging_key": "staging:a"}
        assert executor.submit(ADMIT_UPLOAD, kwargs, DEFAULT_QUEUE).get(timeout_s=30) == {
            "status": "admitted"
        }
        # The identical bytes again (the retry of an upload whose storing never happened: the backend died
        # after its admission) are the same message, admitted again; other bytes under that sequence are not.
        assert executor.submit(ADMIT_UPLOAD, kwargs, DEFAULT_QUEUE).get(timeout_s=30) == {
            "status": "admitted"
        }
        other = seal_activations(
            keys, ref, torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.long), torch.float32
        )
        store.put_if_absent("staging:c", other, 30)
        with pytest.raises(errors.ReplayedMessage):  # the same sequence, another message: a replay
            executor.submit(ADMIT_UPLOAD, kwargs | {"staging_key": "staging:c"}, DEFAULT_QUEUE).get(
                timeout_s=30
            )
        store.put_if_absent("staging:b", sealed[:-3], 30)
        with pytest.raises(errors.TamperedMessage):
            executor.submit(ADMIT_UPLOAD, kwargs | {"staging_key": "staging:b"}, DEFAULT_QUEUE).get(
                timeout_s=30
            )
    finally:
        executor.close()
