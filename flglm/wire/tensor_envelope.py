"""Tensors in sealed envelopes: one tensor as raw bytes described by the header, or a safetensors dict.

`seal_tensor` puts one tensor's elements (optionally cast to the job's wire dtype) into a `seal`ed envelope
whose authenticated header says format "tensor", the sender's dtype, the shape and the wire dtype;
`open_tensor` checks those against the receiver's expectations and the payload size *before* decrypting.
`seal_tensors` / `open_tensors` carry a name → tensor dict as safetensors ("safetensors" format), validated
by `decode_tensors` after decryption. The envelope itself (header, AEAD, chunks) is `flglm.wire.envelope`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from flglm.wire.codec import (
    cast_for_wire,
    cast_from_wire,
    decode_tensors,
    dtype_from_name,
    dtype_name,
    encode_tensors,
    payload_nbytes,
    tensor_bytes,
    tensor_over_buffer,
)
from flglm.wire.directions import Direction
from flglm.wire.envelope import DEFAULT_CHUNK_BYTES, EnvelopeHeader, open_envelope, read_header, seal
from flglm.wire.errors import DecodeError, UnexpectedTensorError
from flglm.wire.header_checks import DEFAULT_MAX_BYTES
from flglm.wire.keys import ChannelKeys
from flglm.wire.sequence import SequenceGuard

__all__ = ["open_tensor", "open_tensors", "seal_tensor", "seal_tensors"]


def seal_tensor(
    keys: ChannelKeys,
    header: EnvelopeHeader,
    tensor: torch.Tensor,
    *,
    wire_dtype: torch.dtype | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> bytearray:
    """`seal` one tensor, optionally cast to the job's wire dtype (float tensors only)."""
    on_wire = cast_for_wire(tensor, wire_dtype)  # (same shape as tensor)
    header = dataclasses.replace(
        header,
        format="tensor",
        dtype=dtype_name(tensor.dtype),
        shape=tuple(tensor.shape),
        wire_dtype=dtype_name(on_wire.dtype),
    )
    return seal(keys, header, tensor_bytes(on_wire), chunk_bytes=chunk_bytes)


def open_tensor(
    keys: ChannelKeys,
    data: bytes | bytearray | memoryview,
    *,
    expected_job: str,
    expected_client: str,
    expected_direction: Direction,
    expected_round: int | None = None,
    expected_step: int | None = None,
    expected_dtype: torch.dtype | None = None,
    expected_shape: Sequence[int] | None = None,
    expected_wire_dtype: torch.dtype | None = None,
    replay_guard: SequenceGuard | None = None,
    max_payload_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[EnvelopeHeader, torch.Tensor]:
    """`open_envelope` + decode: the tensor comes back in the sender's dtype, checked against expectations."""
    header, _ = read_header(data)
    if header.format != "tensor" or header.dtype is None or header.shape is None or header.wire_dtype is None:
        raise DecodeError(f"envelope holds {header.format!r}, not a tensor with dtype, shape and wire dtype")
    dtype, wire = dtype_from_name(header.dtype), dtype_from_name(header.wire_dtype)
    shape = header.shape
    if expected_dtype is not None and dtype != expected_dtype:
        raise UnexpectedTensorError(f"tensor dtype {header.dtype}, expected {dtype_name(expected_dtype)}")
    if expected_shape is not None and header.shape != tuple(expected_shape):
        raise UnexpectedTensorError(f"tensor shape {list(header.shape)}, expected {list(expected_shape)}")
    if expected_wire_dtype is not None and wire != expected_wire_dtype:
        raise UnexpectedTensorError(
            f"wire dtype {header.wire_dtype}, job expects {dtype_name(expected_wire_dtype)}"
        )
    if wire != dtype and not (dtype.is_floating_point and wire.is_floating_point):
        raise DecodeError(f"a {header.dtype} tensor cannot travel as {header.wire_dtype}")
    if payload_nbytes(wire, header.shape) != header.payload_bytes:
        raise DecodeError("envelope payload size does not match its tensor dtype and shape")
    header, payload = open_envelope(
        keys,
        data,
        expected_job=expected_job,
        expected_client=expected_client,
        expected_direction=expected_direction,
        expected_round=expected_round,
        expected_step=expected_step,
        max_payload_bytes=max_payload_bytes,
    )
    tensor = cast_from_wire(tensor_over_buffer(payload, wire, shape), dtype)  # (*shape)
    if replay_guard is not None:
        replay_guard.accept(header)
    return header, tensor


def seal_tensors(
    keys: ChannelKeys,
    header: EnvelopeHeader,
    tensors: Mapping[str, torch.Tensor],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> bytearray:
    """`seal` a name → tensor dict (adapter weights) as safetensors."""
    header = dataclasses.replace(header, format="safetensors", dtype=None, shape=None, wire_dtype=None)
    return seal(keys, header, encode_tensors(tensors), chunk_bytes=chunk_bytes)


def open_tensors(
    keys: ChannelKeys,
    data: bytes | bytearray | memoryview,
    *,
    expected_job: str,
    expected_client: str,
    expected_direction: Direction,
    expected_round: int | None = None,
    expected: Mapping[str, tuple[torch.dtype, Sequence[int]]] | None = None,
    replay_guard: SequenceGuard | None = None,
    max_payload_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[EnvelopeHeader, dict[str, torch.Tensor]]:
    """`open_envelope` + validated safetensors decode of a tensor dict."""
    header, payload = open_envelope(
        keys,
        data,
        expected_job=expected_job,
        expected_client=expected_client,
        expected_direction=expected_direction,
        expected_round=expected_round,
        max_payload_bytes=max_payload_bytes,
    )
    if header.format != "safetensors":
        raise DecodeError(f"envelope holds {header.format!r}, not a safetensors tensor dict")
    tensors = decode_tensors(payload, max_bytes=max_payload_bytes, expected=expected)
    if replay_guard is not None:
        replay_guard.accept(header)
    return header, tensors
