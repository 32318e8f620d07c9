"""Tensors in envelopes: round trips of every dtype, wire dtypes, tensor dicts, and checks of the header."""

import dataclasses

import pytest
import torch

from flglm.wire.codec import WIRE_DTYPES, encode_tensors
from flglm.wire.directions import Direction
from flglm.wire.envelope import EnvelopeHeader, seal
from flglm.wire.errors import DecodeError, PayloadTooLargeError, UnexpectedTensorError
from flglm.wire.keys import ChannelKeys, derive_channel_keys, generate_private_key
from flglm.wire.tensor_envelope import open_tensor, open_tensors, seal_tensor, seal_tensors

SERVER = generate_private_key()
CLIENT_A = generate_private_key()


def keys_for() -> ChannelKeys:
    return derive_channel_keys(CLIENT_A, SERVER.public_key(), "job-1", "client-a")


def header_for(direction: Direction = Direction.activations) -> EnvelopeHeader:
    return EnvelopeHeader(
        job_id="job-1", round=2, step=7, client_id="client-a", direction=direction, sequence=1
    )


def open_a_tensor(data: bytes | bytearray, **kwargs: object) -> torch.Tensor:
    options: dict = {
        "expected_job": "job-1",
        "expected_client": "client-a",
        "expected_direction": Direction.activations,
    } | kwargs
    return open_tensor(keys_for(), data, **options)[1]


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES.values()))
def test_tensor_round_trip_of_every_dtype(dtype: torch.dtype) -> None:
    tensor = (torch.randn(2, 3, 4) * 50).to(dtype)  # (batch, seq, hidden)
    sealed = seal_tensor(keys_for(), header_for(), tensor, chunk_bytes=20)
    header, opened = open_tensor(
        keys_for(),
        sealed,
        expected_job="job-1",
        expected_client="client-a",
        expected_direction=Direction.activations,
        expected_dtype=dtype,
        expected_shape=(2, 3, 4),
    )
    assert opened.dtype == dtype and torch.equal(opened, tensor)
    assert header.dtype == header.wire_dtype


@pytest.mark.parametrize("wire_dtype", [torch.bfloat16, torch.float16])
def test_wire_dtype_halves_the_payload_and_restores_the_dtype(wire_dtype: torch.dtype) -> None:
    hidden = torch.randn(2, 5, 8)  # (batch, seq, hidden)
    sealed = seal_tensor(keys_for(), header_for(), hidden, wire_dtype=wire_dtype)
    header, opened = open_tensor(
        keys_for(),
        sealed,
        expected_job="job-1",
        expected_client="client-a",
        expected_direction=Direction.activations,
        expected_wire_dtype=wire_dtype,
    )
    assert header.payload_bytes == hidden.numel() * 2
    assert opened.dtype == torch.float32
    assert torch.equal(opened, hidden.to(wire_dtype).float())
    with pytest.raises(UnexpectedTensorError, match="job expects float32"):
        open_tensor(
            keys_for(),
            sealed,
            expected_job="job-1",
            expected_client="client-a",
            expected_direction=Direction.activations,
            expected_wire_dtype=torch.float32,
        )


def test_integer_tensors_ignore_the_wire_dtype() -> None:
    ids = torch.arange(10).reshape(2, 5)  # (batch, seq)
    sealed = seal_tensor(keys_for(), header_for(), ids, wire_dtype=torch.bfloat16)
    header, opened = open_tensor(
        keys_for(),
        sealed,
        expected_job="job-1",
        expected_client="client-a",
        expected_direction=Direction.activations,
    )
    assert header.wire_dtype == "int64" and torch.equal(opened, ids)


def test_tensor_dict_round_trip() -> None:
    state = {"lora_A": torch.randn(4, 8), "lora_B": torch.zeros(8, 4, dtype=torch.bfloat16)}
    sealed = seal_tensors(keys_for(), header_for(Direction.adapters_up), state)
    header, opened = open_tensors(
        keys_for(),
        sealed,
        expected_job="job-1",
        expected_client="client-a",
        expected_direction=Direction.adapters_up,
        expected={"lora_A": (torch.float32, (4, 8)), "lora_B": (torch.bfloat16, (8, 4))},
    )
    assert header.format == "safetensors"
    assert all(torch.equal(opened[name], state[name]) for name in state)
    with pytest.raises(DecodeError, match="not a tensor"):
        open_tensor(
            keys_for(),
            sealed,
            expected_job="job-1",
            expected_client="client-a",
            expected_direction=Direction.adapters_up,
        )


def test_the_payload_of_safetensors_envelopes_is_validated_after_decryption() -> None:
    # An authentic but malformed payload (the sender's bug, or a compromised sender) is a clean DecodeError.
    header = dataclasses.replace(header_for(Direction.adapters_up), format="safetensors")
    sealed = seal(keys_for(), header, encode_tensors({"a": torch.zeros(2)})[:-1])
    with pytest.raises(DecodeError):
        open_tensors(
            keys_for(),
            sealed,
            expected_job="job-1",
            expected_client="client-a",
            expected_direction=Direction.adapters_up,
        )


def tensor_header(
    shape: tuple[int, ...], dtype: str = "float32", wire_dtype: str = "float32"
) -> EnvelopeHeader:
    return dataclasses.replace(header_for(), format="tensor", dtype=dtype, shape=shape, wire_dtype=wire_dtype)


def test_a_tensor_header_that_disagrees_with_its_payload_is_refused_before_decrypting() -> None:
    # Authentic envelopes from a buggy or compromised sender: the header is checked against the payload size.
    with pytest.raises(DecodeError, match="payload size"):
        open_a_tensor(seal(keys_for(), tensor_header((2, 3)), bytes(4 * 6 - 1)))
    with pytest.raises(DecodeError, match="payload size"):  # 16 TiB claimed, 4 bytes sent: nothing allocated
        open_a_tensor(seal(keys_for(), tensor_header((2**21, 2**21)), bytes(4)))
    with pytest.raises(PayloadTooLargeError):
        open_a_tensor(seal(keys_for(), tensor_header((2, 3)), bytes(24)), max_payload_bytes=23)
    with pytest.raises(DecodeError, match="cannot travel as"):
        open_a_tensor(seal(keys_for(), tensor_header((2,), "int64", "bfloat16"), bytes(4)))
    with pytest.raises(DecodeError, match="not a tensor"):
        open_a_tensor(seal(keys_for(), header_for(), bytes(8)))  # format "bytes"
    with pytest.raises(UnexpectedTensorError, match=r"shape \[2, 3\], expected \[3, 2\]"):
        open_a_tensor(seal(keys_for(), tensor_header((2, 3)), bytes(24)), expected_shape=(3, 2))
    with pytest.raises(UnexpectedTensorError, match="dtype float32, expected bfloat16"):
        open_a_tensor(seal(keys_for(), tensor_header((2, 3)), bytes(24)), expected_dtype=torch.bfloat16)
    assert torch.equal(open_a_tensor(seal(keys_for(), tensor_header((2, 3)), bytes(24))), torch.zeros(2, 3))
