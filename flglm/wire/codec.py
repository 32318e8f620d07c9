"""Tensor codec: one tensor's raw element bytes (its dtype and shape travel elsewhere) and safetensors dicts.

Nothing here unpickles or evaluates anything. Decoders check every length *before* allocating, so a
hostile header that claims a huge shape is refused without touching memory, and they reject wrong dtype,
shape, size and trailing bytes with a `DecodeError` naming the problem.

One tensor (`tensor_bytes` / `tensor_over_buffer`) is its C-contiguous little-endian elements and nothing
else: the sealed envelope's authenticated header carries its dtype and shape (`flglm.wire.tensor_envelope`).
Tensor dicts (`encode_tensors`: h0 with its attention mask, adapter state dicts) use the safetensors format,
whose JSON header we parse and check ourselves (dtypes, shapes, offsets contiguous and covering the buffer
exactly) before safetensors sees the bytes.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from flglm.wire.errors import DecodeError, PayloadTooLargeError, UnexpectedTensorError, WireError
from flglm.wire.header_checks import (
    DEFAULT_MAX_BYTES,
    MAX_NDIM,
    reject_duplicate_json_keys,
    validate_shape,
)

# The torch dtypes of `WIRE_DTYPE_NAMES`, in the same order (a test checks they agree).
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
FLOAT_WIRE_DTYPES = ("float32", "float16", "bfloat16")
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}

MAX_SAFETENSORS_HEADER_BYTES = 8 * 2**20
MAX_DICT_TENSORS = 65_536


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; `WireError` for a dtype the wire format does not carry."""
    for name, candidate in WIRE_DTYPES.items():
        if candidate == dtype:
            return name
    raise WireError(f"dtype {dtype} is not a wire dtype; supported: {', '.join(WIRE_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    """Torch dtype of a wire name; `DecodeError` for anything else (names come from untrusted headers)."""
    if not isinstance(name, str) or name not in WIRE_DTYPES:
        raise DecodeError(f"unsupported dtype {name!r}; supported: {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def payload_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Exact byte size of a tensor of this dtype and shape (Python ints: no overflow on hostile shapes)."""
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * dtype.itemsize


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise WireError("the wire format is little-endian; this host is big-endian and is not supported")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Zero-copy (when already contiguous on the CPU) byte view of a tensor's elements, little-endian."""
    _require_little_endian()
    dtype_name(tensor.dtype)
    flat = tensor.detach().cpu().contiguous().reshape(-1)  # (numel,)
    # Viewing as uint8 first lets numpy expose bfloat16, which it has no dtype for.
    return flat.view(torch.uint8).numpy().data


def tensor_over_buffer(buffer: bytearray, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Tensor that takes over `buffer` (no copy); its length must already equal the dtype/shape size."""
    _require_little_endian()
    expected = payload_nbytes(dtype, shape)
    if len(buffer) != expected:
        raise DecodeError(f"tensor data is {len(buffer)} bytes; dtype/shape need exactly {expected}")
    if expected == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(tuple(shape))


def tensor_from_bytes(
    data: bytes | bytearray | memoryview,
    *,
    dtype: torch.dtype,
    shape: Sequence[int],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Copy raw element bytes into a new tensor after checking the size against dtype, shape and max_bytes."""
    shape = validate_shape(shape)
    expected = payload_nbytes(dtype, shape)
    if expected > max_bytes:
        raise PayloadTooLargeError(f"tensor of shape {list(shape)} needs {expected} bytes; limit {max_bytes}")
    if len(data) != expected:
        raise DecodeError(f"tensor data is {len(data)} bytes; dtype/shape need exactly {expected}")
    return tensor_over_buffer(bytearray(data), dtype, shape)


def _check_expected(
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    expected_dtype: torch.dtype | None,
    expected_shape: Sequence[int] | None,
) -> None:
    if expected_dtype is not None and dtype != expected_dtype:
        wanted = dtype_name(expected_dtype)
        raise UnexpectedTensorError(f"{name}: dtype {dtype_name(dtype)}, expected {wanted}")
    if expected_shape is not None and shape != tuple(expected_shape):
        raise UnexpectedTensorError(f"{name}: shape {list(shape)}, expected {list(expected_shape)}")


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Safetensors bytes of a name → tensor dict (adapter state dicts); only wire dtypes are allowed."""
    if len(tensors) > MAX_DICT_TENSORS:
        raise WireError(f"{len(tensors)} tensors; at most {MAX_DICT_TENSORS} per dict")
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise WireError(f"invalid tensor name {name!r}")
        dtype_name(tensor.dtype)
        if tensor.dim() > MAX_NDIM:
            raise WireError(f"{name}: {tensor.dim()} dimensions; at most {MAX_NDIM} are allowed")
        # clone(): safetensors refuses tensors that share storage (tied weights, views of one buffer).
        prepared[name] = tensor.detach().cpu().contiguous().clone()
    return safetensors_save(prepared)


TensorLayout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _parse_safetensors_header(view: memoryview, max_bytes: int) -> TensorLayout:
    """Check a safetensors header completely; return name → (dtype, shape)."""
    if len(view) < 8:
        raise DecodeError(f"safetensors data is {len(view)} bytes; its length prefix alone needs 8")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        limit = MAX_SAFETENSORS_HEADER_BYTES
        raise DecodeError(f"safetensors header claims {header_len} bytes; limit {limit}")
    if header_len > len(view) - 8:
        raise DecodeError(f"safetensors header claims {header_len} bytes but only {len(view) - 8} follow")
    try:
        text = bytes(view[8 : 8 + header_len]).decode("utf-8")
        header = json.loads(text, object_pairs_hook=reject_duplicate_json_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DecodeError(f"safetensors header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise DecodeError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise DecodeError("safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_DICT_TENSORS:
        raise DecodeError(f"safetensors header lists {len(header)} tensors; at most {MAX_DICT_TENSORS}")
    spans: list[tuple[int, int, str]] = []
    layout: TensorLayout = {}
    for name, entry in header.items():
        if not name:
            raise DecodeError("empty tensor name in the safetensors header")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise DecodeError(f"{name}: entry must have exactly dtype, shape and data_offsets")
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise DecodeError(f"{name}: unsupported safetensors dtype {entry['dtype']!r}")
        dtype = WIRE_DTYPES[_SAFETENSORS_DTYPES[entry["dtype"]]]
        shape = validate_shape(entry["shape"])
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise DecodeError(f"{name}: data_offsets must be two ordered non-negative integers")
        needed = payload_nbytes(dtype, shape)
        if needed > max_bytes:
            raise PayloadTooLargeError(f"{name}: shape {list(shape)} = {needed} bytes; limit {max_bytes}")
        if offsets[1] - offsets[0] != needed:
            span = offsets[1] - offsets[0]
            raise DecodeError(f"{name}: data_offsets span {span} bytes, dtype/shape need {needed}")
        spans.append((offsets[0], offsets[1], name))
        layout[name] = (dtype, shape)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise DecodeError(f"{name}: data starts at {begin}, expected {position} (gap or overlap)")
        position = end
    body_len = len(view) - 8 - header_len
    if position != body_len:
        raise DecodeError(f"tensor data covers {position} bytes but {body_len} follow the header")
    return layout


def decode_tensors(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected: Mapping[str, tuple[torch.dtype, Sequence[int]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of `encode_tensors`; the header is fully validated before safetensors parses anything."""
    view = memoryview(data).cast("B")
    if len(view) > max_bytes + MAX_SAFETENSORS_HEADER_BYTES + 8:
        raise PayloadTooLargeError(f"encoded tensors are {len(view)} bytes; limit {max_bytes}")
    layout = _parse_safetensors_header(view, max_bytes)
    if expected is not None:
        missing = sorted(set(expected) - set(layout))
        extra = sorted(set(layout) - set(expected))
        if missing or extra:
            raise UnexpectedTensorError(f"tensor names differ: missing {missing}, unexpected {extra}")
        for name, (dtype, shape) in layout.items():
            _check_expected(name, dtype, shape, *expected[name])
    try:
        loaded = safetensors_load(bytes(view))
    except Exception as exc:  # safetensors raises its own error types; callers get one
        raise DecodeError(f"safetensors rejected the data: {exc}") from None
    for name, (dtype, shape) in layout.items():
        # Belt and braces: what safetensors built must be what we validated.
        if loaded[name].dtype != dtype or tuple(loaded[name].shape) != shape:
            raise DecodeError(f"{name}: safetensors produced a tensor that differs from its header")
    return loaded


def parse_wire_dtype(name: str | None) -> torch.dtype | None:
    """Job setting → dtype floats travel as (None: as computed). `WireError` for an unknown name."""
    if name is None or name == "":
        return None
    if name not in FLOAT_WIRE_DTYPES:
        raise WireError(f"wire dtype {name!r} is not one of {', '.join(FLOAT_WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def cast_for_wire(tensor: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensor cast to the job's wire dtype (integers and wire_dtype=None pass through).

    float16 saturates above 65504; a finite value that would become inf raises instead of
    silently corrupting training (bfloat16 has float32's range and never overflows here).
    """
    if wire_dtype is None or not tensor.is_floating_point() or tensor.dtype == wire_dtype:
        return tensor
    if wire_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise WireError(f"wire dtype {wire_dtype} is not a float wire dtype")
    cast = tensor.to(wire_dtype)
    if wire_dtype == torch.float16 and bool(torch.isinf(cast).any()) and not bool(torch.isinf(tensor).any()):
        raise WireError("tensor overflows float16 on the wire (|x| > 65504); use bfloat16 for this job")
    return cast


def cast_from_wire(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tensor received in its wire dtype, back in the dtype the sender computed in."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
