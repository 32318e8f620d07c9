"""Sealed envelopes: an authenticated header plus AES-256-GCM chunks under a fresh per-message subkey.

Layout (integers big-endian)::

    0   magic b"FLGW"
    4   u8   format version (1)
    5   u32  header length H (at most MAX_HEADER_BYTES)
    9   H    header: canonical JSON of `EnvelopeHeader`, incl. a random 32-byte salt
    ..   chunk_count × (nonce 12 | ciphertext | GCM tag 16)

Per message: subkey = HKDF-SHA256(ikm = the (job, client, direction) key, salt = header.salt,
info = "flglm-wire/v1 message" | SHA-256(header bytes)). Chunk i is sealed under the subkey with
nonce = i (96-bit big-endian) and the full header bytes as associated data. The nonce is on the wire
but must equal i, so chunks cannot be reordered; the header's chunk count and payload size are
authenticated, so chunks cannot be dropped or added. See `flglm.wire` for why this nonce design is safe
for a distributed, retrying server without any shared counter.

The payload is opaque bytes here, and this module imports no torch; tensors are put into and taken out of
envelopes by `flglm.wire.tensor_envelope`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flglm.wire.directions import Direction
from flglm.wire.errors import (
    AuthenticationError,
    DecodeError,
    EnvelopeMismatchError,
    PayloadTooLargeError,
    WireError,
)
from flglm.wire.header_checks import (
    DEFAULT_MAX_BYTES,
    WIRE_DTYPE_NAMES,
    reject_duplicate_json_keys,
    validate_shape,
)
from flglm.wire.keys import MAX_ID_BYTES, PROTOCOL_LABEL, ChannelKeys
from flglm.wire.sequence import MAX_SEQUENCE, SequenceGuard

__all__ = [
    "AEAD_MAX_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "Direction",
    "EnvelopeHeader",
    "open_envelope",
    "read_header",
    "seal",
]

ENVELOPE_MAGIC = b"FLGW"
ENVELOPE_VERSION = 1
AEAD_MAX_BYTES = 2**31 - 1  # the most one AES-GCM call of `cryptography` takes
DEFAULT_CHUNK_BYTES = 2**30  # below the AEAD limit; (8, 512, 4096) bf16 = 32 MiB is one chunk
MAX_HEADER_BYTES = 16 * 1024
MAX_CHUNKS = 2**32
NONCE_BYTES = 12
TAG_BYTES = 16
SALT_BYTES = 32
_PREFIX = struct.Struct(">4sBI")
PayloadFormat = Literal["tensor", "safetensors", "bytes"]
_FORMATS = ("tensor", "safetensors", "bytes")
_HEADER_FIELDS = frozenset(
    {
        "version",
        "job_id",
        "client_id",
        "round",
        "step",
        "direction",
        "sequence",
        "format",
        "dtype",
        "shape",
        "wire_dtype",
        "payload_bytes",
        "chunk_bytes",
        "chunk_count",
        "salt",
    }
)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError(f"header {name} must be an integer in [{low}, {high}], got {value!r}")


def _check_id(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise WireError(f"header {name} must be a non-empty string of at most {MAX_ID_BYTES} bytes")


@dataclass(frozen=True)
class EnvelopeHeader:
    """Everything a receiver needs to route and check a message; all of it is authenticated.

    Senders fill the first block; `seal` sets format, dtype/shape/wire_dtype (for tensors), the
    payload/chunk sizes and the salt. Server replies carry the sequence of the request they answer.
    """

    job_id: str
    round: int
    step: int
    client_id: str
    direction: Direction
    sequence: int
    format: PayloadFormat = "bytes"
    dtype: str | None = None  # dtype the sender computed in, restored by the receiver
    shape: tuple[int, ...] | None = None
    wire_dtype: str | None = None  # dtype of the bytes on the wire (e.g. bfloat16 for float32 tensors)
    payload_bytes: int = 0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    chunk_count: int = 1
    salt: bytes = b""
    version: int = ENVELOPE_VERSION

    def __post_init__(self) -> None:
        if self.version != ENVELOPE_VERSION:
            raise WireError(f"envelope version {self.version!r} is not supported (this side speaks 1)")
        _check_id("job_id", self.job_id)
        _check_id("client_id", self.client_id)
        _check_int("round", self.round, 0, MAX_SEQUENCE)
        _check_int("step", self.step, 0, MAX_SEQUENCE)
        _check_int("sequence", self.sequence, 0, MAX_SEQUENCE)
        if not isinstance(self.direction, str) or self.direction not in set(Direction):
            raise WireError(
                f"header direction {self.direction!r} is not one of {[d.value for d in Direction]}"
            )
        object.__setattr__(self, "direction", Direction(self.direction))
        if not isinstance(self.format, str) or self.format not in _FORMATS:
            raise WireError(f"header format {self.format!r} is not one of {_FORMATS}")
        for name in ("dtype", "wire_dtype"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value not in WIRE_DTYPE_NAMES):
                raise WireError(f"header {name} {value!r} is not one of {list(WIRE_DTYPE_NAMES)}")
        if self.shape is not None:
            object.__setattr__(self, "shape", validate_shape(self.shape))
        _check_int("payload_bytes", self.payload_bytes, 0, MAX_SEQUENCE)
        _check_int("chunk_bytes", self.chunk_bytes, 1, AEAD_MAX_BYTES)
        _check_int("chunk_count", self.chunk_count, 1, MAX_CHUNKS)
        if not isinstance(self.salt, bytes) or len(self.salt) not in (0, SALT_BYTES):
            raise WireError(f"header salt must be {SALT_BYTES} bytes")

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the exact bytes that are authenticated."""
        fields = dataclasses.asdict(self)
        fields["direction"] = self.direction.value
        fields["shape"] = None if self.shape is None else list(self.shape)
        fields["salt"] = self.salt.hex()
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> EnvelopeHeader:
        """Strict parse: exactly the known fields with the right types, else `DecodeError`."""
        try:
            fields = json.loads(data.decode("utf-8"), object_pairs_hook=reject_duplicate_json_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise DecodeError(f"envelope header is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(fields, dict) or set(fields) != _HEADER_FIELDS:
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise DecodeError(f"envelope header fields are {got}, expected {sorted(_HEADER_FIELDS)}")
        salt = fields["salt"]
        if not isinstance(salt, str) or len(salt) != 2 * SALT_BYTES:
            raise DecodeError(f"envelope salt must be {SALT_BYTES} bytes of hex")
        try:
            fields["salt"] = bytes.fromhex(salt)
            if fields["shape"] is not None and not isinstance(fields["shape"], list):
                raise WireError("header shape must be a list or null")
            return cls(**fields)
        except (ValueError, TypeError) as exc:  # WireError is a ValueError, as is a bad hex salt
            raise DecodeError(f"envelope header is invalid: {exc}") from None


def _chunk_count(payload_bytes: int, chunk_bytes: int) -> int:
    return max(1, -(-payload_bytes // chunk_bytes))  # an empty payload is still one (authenticated) chunk


def _message_cipher(keys: ChannelKeys, direction: Direction, header_bytes: bytes, salt: bytes) -> AESGCM:
    info = PROTOCOL_LABEL + b" message" + hashlib.sha256(header_bytes).digest()
    subkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(keys.key_for(direction))
    return AESGCM(subkey)


def _nonce(index: int) -> bytes:
    return index.to_bytes(NONCE_BYTES, "big")


def seal(
    keys: ChannelKeys,
    header: EnvelopeHeader,
    payload: bytes | bytearray | memoryview,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> bytearray:
    """Encrypt `payload` for `header`'s (job, client, direction); the envelope is a bytearray (no copy)."""
    if (header.job_id, header.client_id) != (keys.job_id, keys.client_id):
        raise WireError(
            f"header is for job {header.job_id!r} / client {header.client_id!r} but the keys are for "
            f"job {keys.job_id!r} / client {keys.client_id!r}"
        )
    _check_int("chunk_bytes", chunk_bytes, 1, AEAD_MAX_BYTES)
    view = memoryview(payload).cast("B")
    header = dataclasses.replace(
        header,
        payload_bytes=len(view),
        chunk_bytes=chunk_bytes,
        chunk_count=_chunk_count(len(view), chunk_bytes),
        salt=os.urandom(SALT_BYTES),  # makes every message's subkey fresh, even for an identical header
    )
    header_bytes = header.to_bytes()
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise WireError(f"envelope header is {len(header_bytes)} bytes; at most {MAX_HEADER_BYTES}")
    cipher = _message_cipher(keys, header.direction, header_bytes, header.salt)
    total = _PREFIX.size + len(header_bytes) + len(view) + header.chunk_count * (NONCE_BYTES + TAG_BYTES)
    out = bytearray(total)
    _PREFIX.pack_into(out, 0, ENVELOPE_MAGIC, ENVELOPE_VERSION, len(header_bytes))
    position = _PREFIX.size
    out[position : position + len(header_bytes)] = header_bytes
    position += len(header_bytes)
    out_view = memoryview(out)
    for index in range(header.chunk_count):
        chunk = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        nonce = _nonce(index)
        out_view[position : position + NONCE_BYTES] = nonce
        position += NONCE_BYTES
        end = position + len(chunk) + TAG_BYTES
        cipher.encrypt_into(nonce, chunk, header_bytes, out_view[position:end])
        position = end
    return out


def read_header(data: bytes | bytearray | memoryview) -> tuple[EnvelopeHeader, bytes]:
    """Parse (not authenticate) an envelope's header, e.g. to route it; returns it and its raw bytes."""
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise DecodeError(f"envelope is {len(view)} bytes; its prefix alone needs {_PREFIX.size}")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != ENVELOPE_MAGIC:
        raise DecodeError(f"not an FL-GLM envelope (magic {bytes(magic)!r}, expected {ENVELOPE_MAGIC!r})")
    if version != ENVELOPE_VERSION:
        raise DecodeError(
            f"envelope version {version} is not supported (this side speaks {ENVELOPE_VERSION})"
        )
    if header_len > MAX_HEADER_BYTES:
        raise DecodeError(f"envelope header claims {header_len} bytes; at most {MAX_HEADER_BYTES}")
    if len(view) < _PREFIX.size + header_len:
        raise DecodeError("envelope is truncated inside its header")
    header_bytes = bytes(view[_PREFIX.size : _PREFIX.size + header_len])
    return EnvelopeHeader.from_bytes(header_bytes), header_bytes


def open_envelope(
    keys: ChannelKeys,
    data: bytes | bytearray | memoryview,
    *,
    expected_job: str,
    expected_client: str,
    expected_direction: Direction,
    expected_round: int | None = None,
    expected_step: int | None = None,
    replay_guard: SequenceGuard | None = None,
    max_payload_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[EnvelopeHeader, bytearray]:
    """Check, authenticate and decrypt an envelope; returns its header and plaintext payload.

    Order matters: cheap structural checks and the routing fields first (nothing is allocated beyond
    what `data` already proves exists), then every chunk's tag, and only then the replay guard — so an
    unauthenticated message can never advance a sequence.
    """
    if (keys.job_id, keys.client_id) != (expected_job, expected_client):
        raise EnvelopeMismatchError(
            f"keys are for job {keys.job_id!r} / client {keys.client_id!r}, "
            f"not the expected {expected_job!r} / {expected_client!r}"
        )
    view = memoryview(data).cast("B")
    header, header_bytes = read_header(view)
    expected = {
        "job_id": expected_job,
        "client_id": expected_client,
        "direction": Direction(expected_direction),
        "round": expected_round,
        "step": expected_step,
    }
    for name, value in expected.items():
        if value is not None and getattr(header, name) != value:
            raise EnvelopeMismatchError(f"envelope {name} is {getattr(header, name)!r}, expected {value!r}")
    if header.payload_bytes > max_payload_bytes:
        raise PayloadTooLargeError(
            f"envelope payload is {header.payload_bytes} bytes; limit {max_payload_bytes}"
        )
    if header.chunk_count != _chunk_count(header.payload_bytes, header.chunk_bytes):
        raise DecodeError("envelope chunk count does not match its payload and chunk sizes")
    body_start = _PREFIX.size + len(header_bytes)
    expected_len = body_start + header.payload_bytes + header.chunk_count * (NONCE_BYTES + TAG_BYTES)
    if len(view) != expected_len:
        problem = "truncated" if len(view) < expected_len else "followed by trailing bytes"
        raise DecodeError(f"envelope is {len(view)} bytes, header says {expected_len}: {problem}")
    cipher = _message_cipher(keys, header.direction, header_bytes, header.salt)
    payload = bytearray(header.payload_bytes)
    payload_view = memoryview(payload)
    position = body_start
    for index in range(header.chunk_count):
        plain_len = min(header.chunk_bytes, header.payload_bytes - index * header.chunk_bytes)
        nonce = bytes(view[position : position + NONCE_BYTES])
        if nonce != _nonce(index):
            raise AuthenticationError(f"chunk {index} carries nonce {nonce.hex()}, expected its index")
        position += NONCE_BYTES
        end = position + plain_len + TAG_BYTES
        target = payload_view[index * header.chunk_bytes : index * header.chunk_bytes + plain_len]
        try:
            cipher.decrypt_into(nonce, view[position:end], header_bytes, target)
        except InvalidTag:
            raise AuthenticationError(
                f"chunk {index} of a {header.direction} envelope failed authentication: wrong key "
                "(job, client or direction) or altered bytes"
            ) from None
        position = end
    if replay_guard is not None:
        replay_guard.accept(header)
    return header, payload
