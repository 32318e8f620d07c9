"""Tensor codec: exact round trips of every wire dtype, and clean refusals of malformed or hostile bytes."""

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as safetensors_save

from flglm.wire.codec import (
    WIRE_DTYPES,
    cast_for_wire,
    cast_from_wire,
    decode_tensors,
    encode_tensors,
    parse_wire_dtype,
    tensor_from_bytes,
)
from flglm.wire.errors import DecodeError, PayloadTooLargeError, UnexpectedTensorError, WireError
from flglm.wire.header_checks import WIRE_DTYPE_NAMES


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=generator)
    return (torch.randn(shape, generator=generator) * 100).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so NaNs and signed zeros compare exactly."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def round_trip(tensor: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return decode_tensors(encode_tensors({"t": tensor}), **kwargs)["t"]  # type: ignore[arg-type]


def test_the_torch_free_dtype_names_are_the_codec_dtypes() -> None:
    assert tuple(WIRE_DTYPES) == WIRE_DTYPE_NAMES


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES.values()))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 5), (1,), (2, 3, 4), (2, 1, 1, 1, 1, 1, 1, 3)])
def test_round_trip_is_bit_exact_for_every_dtype_and_shape(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    tensor = sample(dtype, shape)
    decoded = round_trip(tensor, expected={"t": (dtype, shape)})
    assert decoded.dtype == dtype
    assert tuple(decoded.shape) == shape
    assert torch.equal(bits(decoded), bits(tensor))


def test_special_float_values_survive() -> None:
    tensor = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45], dtype=torch.float32)
    assert torch.equal(bits(round_trip(tensor)), bits(tensor))


def test_non_contiguous_and_grad_tensors_encode_their_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6).requires_grad_()
    view = base.t()[1:4]  # (3, 4), not contiguous
    decoded = round_trip(view)
    assert torch.equal(decoded, view.detach())
    assert not decoded.requires_grad


def test_decoded_tensors_own_their_memory() -> None:
    data = bytearray(encode_tensors({"t": torch.ones(4)}))
    decoded = decode_tensors(data)["t"]
    data[-4:] = b"\x00\x00\x00\x00"
    assert torch.equal(decoded, torch.ones(4))


def test_unsupported_dtypes_names_and_ranks_are_refused_on_encode() -> None:
    with pytest.raises(WireError, match="float64"):
        encode_tensors({"t": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(WireError, match="dimensions"):
        encode_tensors({"t": torch.zeros([1] * 9)})
    for name in ("", "__metadata__"):
        with pytest.raises(WireError, match="invalid tensor name"):
            encode_tensors({name: torch.zeros(1)})


def test_pickles_are_refused_not_loaded() -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("executed!",))

    with pytest.raises(DecodeError):
        decode_tensors(pickle.dumps(Boom()))


def test_tensor_from_bytes_checks_the_size() -> None:
    assert torch.equal(
        tensor_from_bytes(bytes(8), dtype=torch.int64, shape=(1,)), torch.zeros(1, dtype=torch.int64)
    )
    with pytest.raises(DecodeError, match="exactly 8"):
        tensor_from_bytes(bytes(9), dtype=torch.int64, shape=(1,))


def state_dict() -> dict[str, torch.Tensor]:
    return {name: sample(dtype, (3, 2)) for name, dtype in WIRE_DTYPES.items()} | {"empty": torch.zeros(0, 4)}


def test_tensor_dict_round_trip_with_expectations() -> None:
    tensors = state_dict()
    expected = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    decoded = decode_tensors(encode_tensors(tensors), expected=expected)
    assert set(decoded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(bits(decoded[name]), bits(tensor))


def test_tensor_dict_with_shared_storage_encodes() -> None:
    weight = torch.randn(4, 4)
    decoded = decode_tensors(encode_tensors({"a": weight, "b": weight[:2]}))
    assert torch.equal(decoded["b"], weight[:2])


def test_tensor_dict_expectations_name_the_difference() -> None:
    data = encode_tensors({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(UnexpectedTensorError, match=r"missing \['c'\], unexpected \['b'\]"):
        decode_tensors(data, expected={"a": (torch.float32, (2,)), "c": (torch.float32, (3,))})
    with pytest.raises(UnexpectedTensorError, match="b: shape"):
        decode_tensors(data, expected={"a": (torch.float32, (2,)), "b": (torch.float32, (4,))})


def safetensors_bytes(header_obj: object, body: bytes) -> bytes:
    raw = json.dumps(header_obj).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01", "length prefix"),
        (struct.pack("<Q", 2**60) + b"{}", "limit"),
        (struct.pack("<Q", 100) + b"{}", "only 2 follow"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "UTF-8 JSON"),
        (safetensors_bytes([1, 2], b""), "not a JSON object"),
        (safetensors_bytes({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)), "F64"),
        (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)),
            "invalid",
        ),
        (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)),
            "need 8",
        ),
        (
            safetensors_bytes(
                {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, bytes(4)
            ),
            "limit",
        ),
        (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(5)),
            "4 bytes",
        ),
        (
            safetensors_bytes(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                bytes(8),
            ),
            "gap or overlap",
        ),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "gap"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "exactly dtype"),
        (safetensors_bytes({"__metadata__": {"x": 1}}, b""), "__metadata__"),
        (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(7)),
            "covers 8",
        ),
        (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, bytes(4)),
            "dimensions",
        ),
        (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
            "invalid",
        ),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, bytes(4)), "list"),
        (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4)),
            "ordered",
        ),
        (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, bytes(4)),
            "ordered",
        ),
        (safetensors_bytes({"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "empty"),
        (safetensors_bytes({"a": [1]}, bytes(4)), "exactly dtype"),
        (b"PK\x03\x04" + bytes(12), "claims"),  # not safetensors at all: a nonsense header length
    ],
)
def test_hostile_safetensors_headers_are_refused_before_safetensors_reads_them(
    data: bytes, message: str
) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_tensors(data)


def test_duplicate_keys_in_a_safetensors_header_are_refused() -> None:
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = ('{"a":' + entry + ',"a":' + entry + "}").encode()
    with pytest.raises(DecodeError, match="duplicate"):
        decode_tensors(struct.pack("<Q", len(raw)) + raw + bytes(4))


def test_safetensors_from_the_reference_writer_are_accepted() -> None:
    data = safetensors_save({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, metadata={"format": "pt"})
    assert torch.equal(decode_tensors(data)["w"], torch.ones(2, 2, dtype=torch.bfloat16))


def test_tensor_dict_size_limit() -> None:
    with pytest.raises(PayloadTooLargeError):
        decode_tensors(encode_tensors({"a": torch.zeros(1024)}), max_bytes=1000)


def test_a_header_claiming_a_huge_shape_is_refused_before_allocating() -> None:
    # 2^40 × 2^20 float32 would be 2^62 bytes: the check must come from arithmetic, not from malloc.
    huge = {"a": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}}
    with pytest.raises(PayloadTooLargeError, match="limit"):
        decode_tensors(safetensors_bytes(huge, bytes(16)))
    honest = {"a": {"dtype": "I64", "shape": [1000], "data_offsets": [0, 8000]}}
    with pytest.raises(PayloadTooLargeError, match="limit 4096"):
        decode_tensors(safetensors_bytes(honest, bytes(8000)), max_bytes=4096)
    with pytest.raises(PayloadTooLargeError, match="encoded tensors"):
        # The whole buffer, before any parsing: over the limit plus the largest header allowed (8 MiB).
        decode_tensors(bytes(9 * 2**20), max_bytes=2**12)


def test_expected_dtype_is_enforced() -> None:
    data = encode_tensors({"a": torch.zeros(2, 3)})
    with pytest.raises(UnexpectedTensorError, match="a: dtype float32, expected bfloat16"):
        decode_tensors(data, expected={"a": (torch.bfloat16, (2, 3))})


def test_cast_for_wire_round_trip_and_pass_through() -> None:
    hidden = torch.randn(2, 3, 8)  # (batch, seq, hidden)
    on_wire = cast_for_wire(hidden, torch.bfloat16)
    assert on_wire.dtype == torch.bfloat16
    back = cast_from_wire(on_wire, torch.float32)
    assert back.dtype == torch.float32
    assert torch.allclose(back, hidden, rtol=2**-8, atol=0)
    ids = torch.arange(5)
    assert cast_for_wire(ids, torch.bfloat16) is ids  # integers never change on the wire
    assert cast_for_wire(hidden, None) is hidden


def test_float16_overflow_is_an_error_not_silent_inf() -> None:
    with pytest.raises(WireError, match="bfloat16"):
        cast_for_wire(torch.tensor([1e6]), torch.float16)
    assert torch.isinf(cast_for_wire(torch.tensor([float("inf")]), torch.float16)).all()


def test_parse_wire_dtype() -> None:
    assert parse_wire_dtype("bfloat16") == torch.bfloat16
    assert parse_wire_dtype(None) is None
    with pytest.raises(WireError, match="int64"):
        parse_wire_dtype("int64")
