"""Torch-free checks of untrusted headers: wire dtype names, size limits, shapes and strict JSON objects.

Both the sealed envelope (whose header names a tensor's dtype and shape) and the safetensors codec (whose
header lists dtypes, shapes and offsets) parse headers an attacker may have written; the checks they share
live here, without torch, so the bytes-level envelope stays importable where torch is not installed.
"""

from __future__ import annotations

from typing import Any

from flglm.wire.errors import DecodeError, PayloadTooLargeError

# The dtypes the models put on the wire: hidden states / gradients (float32, float16, bfloat16) and
# token ids / masks (int64). Names are torch's, so job settings read naturally ("bfloat16").
WIRE_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int64")
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 4 * 2**30  # 4 GiB: far above one step's tensors, far below what would hurt a host
MAX_SHAPE_EXTENT = 2**48  # elements: far above any model tensor, far below torch size-arithmetic overflow


def validate_shape(shape: Any) -> tuple[int, ...]:
    """A shape from an untrusted header as a tuple of non-negative ints, or `DecodeError`."""
    if not isinstance(shape, list | tuple):
        raise DecodeError(f"shape must be a list of integers, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise DecodeError(f"shape has {len(shape)} dimensions; at most {MAX_NDIM} are allowed")
    for dim in shape:
        # bool is an int subclass: `true` in a JSON shape is malformed, not a dimension of 1.
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 or dim >= 2**63:
            raise DecodeError(f"shape {list(shape)!r} has an invalid dimension {dim!r}")
    extent = 1
    for dim in shape:
        extent *= max(dim, 1)
    # Even an empty tensor (a zero dimension) must have sizes torch can index: huge other dimensions
    # would overflow its stride arithmetic.
    if extent > MAX_SHAPE_EXTENT:
        raise PayloadTooLargeError(f"shape {list(shape)!r} exceeds the limit of {MAX_SHAPE_EXTENT} elements")
    return tuple(shape)


def reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` object hook: a repeated key would let two readers see two different headers."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DecodeError(f"duplicate key {key!r} in a JSON header")
        result[key] = value
    return result
