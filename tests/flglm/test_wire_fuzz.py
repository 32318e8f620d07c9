"""Property-based fuzzing of every decoder of wire bytes: random, mutated or hostile input gives a result or a
WireError — safetensors dicts (headers, lengths, dtypes, offsets), envelopes, and tensor envelope headers."""

import dataclasses
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flglm.wire.codec import WIRE_DTYPES, decode_tensors, encode_tensors
from flglm.wire.directions import Direction
from flglm.wire.envelope import EnvelopeHeader, open_envelope, read_header, seal
from flglm.wire.errors import WireError
from flglm.wire.keys import derive_channel_keys, generate_private_key
from flglm.wire.tensor_envelope import open_tensor, open_tensors, seal_tensor

# Thousands of inputs in all, ~2000 on the mutated-message decoders; well under a minute together.
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_LIGHT = settings(FUZZ, max_examples=1000)
pytestmark = pytest.mark.timeout(180)  # a hang fails the test instead of stalling the suite
MAX_BYTES = 4096  # small limit: any claim above it must be refused, so nothing large is ever allocated

KEYS = derive_channel_keys(generate_private_key(), generate_private_key().public_key(), "job", "client")
HEADER = EnvelopeHeader(
    job_id="job", round=0, step=3, client_id="client", direction=Direction.gradients, sequence=9
)
SEALED_BYTES = bytes(seal(KEYS, HEADER, bytes(range(50)), chunk_bytes=20))
SEALED_TENSOR = bytes(
    seal_tensor(KEYS, HEADER, torch.randn(2, 3, 4), wire_dtype=torch.bfloat16, chunk_bytes=16)
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


# Valid encodings to mutate, built once: every dtype, 0-d, empty and multi-dimensional shapes, alone (as h1
# and generation outputs travel), in pairs like h0 with its mask, and in adapter-like dicts.
POOL_SHAPES = [(), (0,), (3,), (2, 3), (1, 0, 4), (2, 2, 2, 2)]
POOL_TENSORS = [
    torch.arange(torch.Size(shape).numel()).reshape(shape).to(dtype)
    for dtype in WIRE_DTYPES.values()
    for shape in POOL_SHAPES
]
DICT_POOL = [encode_tensors({"hidden_states": tensor}) for tensor in POOL_TENSORS] + [
    encode_tensors({f"layer.{k}.lora": POOL_TENSORS[(start + k) % len(POOL_TENSORS)] for k in range(count)})
    for start in range(0, len(POOL_TENSORS), 3)
    for count in (2, 3)
]
SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}  # the wire's, by element size


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """A valid message after 1-3 random edits: flips, overwrites, truncation, insertion, extension."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "append", "u64"]))
        index = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[index] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[index:]
        elif kind == "insert":
            data[index:index] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        elif kind == "u64" and len(data) >= index + 8:
            # Large-number edits are where size arithmetic goes wrong.
            data[index : index + 8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


def decode_or_clean_error(decoder: Callable[..., Any], data: bytes, **kwargs: Any) -> Any:
    try:
        return decoder(data, **kwargs)
    except WireError:
        return None


def with_length_prefix(body: bytes) -> bytes:
    """Random bytes behind a length prefix that fits them, so they reach the header parser."""
    return struct.pack("<Q", len(body)) + body


@FUZZ_LIGHT
@given(
    st.binary(max_size=300)
    | st.binary(max_size=300).map(with_length_prefix)
    | st.binary(max_size=300).map(lambda b: with_length_prefix(b'{"a":' + b))
)
def test_decode_tensors_on_random_bytes(data: bytes) -> None:
    tensors = decode_or_clean_error(decode_tensors, data, max_bytes=MAX_BYTES)
    if tensors is not None:
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= len(data)


@FUZZ_LIGHT
@given(
    st.sampled_from(sorted(SAFETENSORS_DTYPES)),
    st.lists(st.integers(0, 2**64 - 1), max_size=8),
    st.booleans(),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=64),
)
def test_huge_shape_claims_are_refused_before_allocating(
    dtype: str, shape: list[int], honest_offsets: bool, end: int, body: bytes
) -> None:
    claimed = SAFETENSORS_DTYPES[dtype]
    for dim in shape:
        claimed *= dim
    # Honest offsets leave the size limit as the only thing that can refuse a huge claim.
    offsets = [0, claimed if honest_offsets else end]
    raw = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}).encode()
    data = struct.pack("<Q", len(raw)) + raw + body
    if claimed > MAX_BYTES:
        # PayloadTooLargeError, or DecodeError for a dimension no tensor can have (>= 2^63).
        with pytest.raises(WireError):
            decode_tensors(data, max_bytes=MAX_BYTES)
    else:
        decode_or_clean_error(decode_tensors, data, max_bytes=MAX_BYTES)


@FUZZ
@given(st.data())
def test_decode_tensors_on_mutated_safetensors(data: st.DataObject) -> None:
    original = data.draw(st.sampled_from(DICT_POOL))
    mutated = data.draw(mutations(original))
    tensors = decode_or_clean_error(decode_tensors, mutated, max_bytes=MAX_BYTES)
    if tensors is not None:
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= len(mutated)


@FUZZ_LIGHT
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4), st.binary(max_size=64))
def test_decode_tensors_on_random_headers(header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    decode_or_clean_error(decode_tensors, struct.pack("<Q", len(raw)) + raw + body, max_bytes=MAX_BYTES)


@FUZZ_LIGHT
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=4),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "F64", "U8"]),
                "shape": st.lists(st.integers(-2, 2**40), max_size=3),
                "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3),
            }
        ),
        max_size=3,
    ),
    st.binary(max_size=64),
)
def test_decode_tensors_on_plausible_hostile_headers(header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    tensors = decode_or_clean_error(
        decode_tensors, struct.pack("<Q", len(raw)) + raw + body, max_bytes=MAX_BYTES
    )
    if tensors is not None:
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == len(body)


def open_or_clean_error(data: bytes) -> object:
    try:
        return open_envelope(
            KEYS, data, expected_job="job", expected_client="client", expected_direction=Direction.gradients
        )
    except WireError:
        return None


@FUZZ
@given(st.data())
def test_open_envelope_on_mutated_envelopes(data: st.DataObject) -> None:
    mutated = data.draw(mutations(SEALED_BYTES))
    opened = open_or_clean_error(mutated)
    # The only way through authentication is to be the original message.
    assert opened is None or mutated == SEALED_BYTES


@FUZZ_LIGHT
@given(st.data())
def test_open_tensor_on_mutated_envelopes(data: st.DataObject) -> None:
    mutated = data.draw(mutations(SEALED_TENSOR))
    try:
        open_tensor(
            KEYS,
            mutated,
            expected_job="job",
            expected_client="client",
            expected_direction=Direction.gradients,
            max_payload_bytes=MAX_BYTES,
        )
    except WireError:
        return
    assert mutated == SEALED_TENSOR


@FUZZ_LIGHT
@given(st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: b"FLGW\x01" + b))
def test_open_envelope_on_random_bytes(data: bytes) -> None:
    assert open_or_clean_error(data) is None


VALID_HEADER_FIELDS = json.loads(read_header(SEALED_BYTES)[1])


@FUZZ_LIGHT
@given(st.dictionaries(st.sampled_from([*sorted(VALID_HEADER_FIELDS), "extra"]), json_values, max_size=4))
def test_envelope_header_parsing_on_random_field_values(changes: dict) -> None:
    fields = VALID_HEADER_FIELDS | changes
    try:
        header = EnvelopeHeader.from_bytes(json.dumps(fields).encode())
    except WireError:
        return
    assert header.to_bytes()  # whatever parses is a fully valid header


@FUZZ_LIGHT
@given(st.data())
def test_open_tensors_on_authentic_envelopes_of_mutated_safetensors(data: st.DataObject) -> None:
    """A key holder (buggy or compromised) can seal anything: the payload is decoded as hostile."""
    payload = data.draw(mutations(data.draw(st.sampled_from(DICT_POOL))))
    header = EnvelopeHeader(
        job_id="job", round=0, step=0, client_id="client", direction=Direction.adapters_up, sequence=1
    )
    sealed = seal(KEYS, dataclasses.replace(header, format="safetensors"), payload)
    try:
        _, tensors = open_tensors(
            KEYS,
            sealed,
            expected_job="job",
            expected_client="client",
            expected_direction=Direction.adapters_up,
            max_payload_bytes=MAX_BYTES,
        )
    except WireError:
        return
    assert sum(t.numel() * t.element_size() for t in tensors.values()) <= len(payload)


@FUZZ_LIGHT
@given(
    st.sampled_from(sorted(WIRE_DTYPES)),
    st.sampled_from(sorted(WIRE_DTYPES)),
    st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 4), max_size=9),
    st.binary(max_size=64),
)
def test_open_tensor_on_authentic_envelopes_with_hostile_tensor_headers(
    dtype: str, wire_dtype: str, shape: list[int], payload: bytes
) -> None:
    """One tensor travels as raw bytes described by the header: any dtype/shape/size claim is checked."""
    try:
        header = dataclasses.replace(
            HEADER, format="tensor", dtype=dtype, shape=tuple(shape), wire_dtype=wire_dtype
        )
    except WireError:
        return  # the header itself is refused (too many or invalid dimensions, too many elements)
    sealed = seal(KEYS, header, payload)
    try:
        _, tensor = open_tensor(
            KEYS,
            sealed,
            expected_job="job",
            expected_client="client",
            expected_direction=Direction.gradients,
            max_payload_bytes=MAX_BYTES,
        )
    except WireError:
        return
    assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == WIRE_DTYPES[dtype]
    assert tensor.numel() * WIRE_DTYPES[wire_dtype].itemsize == len(payload)
