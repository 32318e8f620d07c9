"""Upload admission (what the backend checks before storing a step message): typed 4xx refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flglm.step_messages import seal_activations, seal_hidden
from flglm.step_protocol import MessageDirection
from flglm.wire.keys import ClientKeyPair, generate_private_key
from flglm.wire.sequence import ReplayGuard
from tests.worker.step_clients import SimulatedClient, make_spec
from worker import errors
from worker.admission import WrongDirection, admit_step_upload


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
