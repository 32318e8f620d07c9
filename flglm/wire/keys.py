"""X25519 key pairs, 0600 key files, and HKDF-SHA256 per-(job, client, direction) AES-256 keys."""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flglm.wire.atomic_file import write_file_atomically
from flglm.wire.directions import Direction
from flglm.wire.errors import InsecureKeyFileError, KeyFormatError, WireError

PROTOCOL_LABEL = b"flglm-wire/v1"
AES_KEY_BYTES = 32
MAX_ID_BYTES = 256
_MAX_KEY_FILE_BYTES = 4096


def generate_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key from the OS CSPRNG."""
    return X25519PrivateKey.generate()


def public_key_to_b64(public_key: X25519PublicKey) -> str:
    """Standard base64 (44 characters) of the raw 32-byte public key, as the control plane stores it."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


_PROBE_KEY = X25519PrivateKey.generate()  # any private key: a low-order point gives zeros with every one


def public_key_from_b64(text: str) -> X25519PublicKey:
    """Parse `public_key_to_b64` output; `KeyFormatError` names what is wrong with anything else."""
    if not isinstance(text, str):
        raise KeyFormatError(f"public key must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("public key is not valid base64") from None
    if len(raw) != 32:
        raise KeyFormatError(f"public key is {len(raw)} bytes; an X25519 public key is 32")
    public_key = X25519PublicKey.from_public_bytes(raw)
    try:
        _PROBE_KEY.exchange(public_key)
    except ValueError:  # OpenSSL refuses an all-zero shared secret: a low-order point agrees on nothing
        raise KeyFormatError(
            "public key is a low-order X25519 point (e.g. all zeros): no shared secret can be agreed with it"
        ) from None
    return public_key


def public_key_fingerprint(public_key: X25519PublicKey) -> str:
    """Short SHA-256 fingerprint for people to compare a key out of band (e.g. at enrollment)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class ClientKeyPair:
    """A client agent's long-term X25519 key pair; only `public_b64` ever leaves the client."""

    private_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> ClientKeyPair:
        return cls(generate_private_key())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClientKeyPair:
        return cls(load_private_key(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        save_private_key(self.private_key, path)

    @property
    def public_key(self) -> X25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_b64(self) -> str:
        return public_key_to_b64(self.public_key)


def save_private_key(
    private_key: X25519PrivateKey, path: str | os.PathLike[str], replace: bool = True
) -> None:
    """Write the key as unencrypted PKCS#8 PEM, mode 0600, atomically (temp file + fsync + rename).

    `replace=False`: a link instead of the rename; FileExistsError when `path` exists."""
    target = Path(path)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_file_atomically(target, pem, mode=0o600, replace=replace)


def load_private_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Read a key written by `save_private_key`; refuses files that group or others can read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW: a symlink could point the agent at another file
            raise KeyFormatError(f"{path} is a symbolic link; point at the key file itself") from None
        raise
    try:
        info = os.fstat(fd)  # fstat on the opened file: no window between the check and the read
        if not stat.S_ISREG(info.st_mode):
            raise KeyFormatError(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise InsecureKeyFileError(
                f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; a private key must be 0600 (chmod 600 it)"
            )
        data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFormatError(f"{path} is too large to be an X25519 private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, X25519PrivateKey):
        raise KeyFormatError(f"{path} holds a {type(key).__name__}, not an X25519 private key")
    return key


def _length_prefixed(value: bytes) -> bytes:
    # Length prefixes keep (job "a|b", client "c") and (job "a", client "b|c") from colliding.
    return len(value).to_bytes(4, "big") + value


def _identifier(kind: str, value: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise WireError(f"{kind} must be a non-empty string")
    encoded = value.encode("utf-8")
    if len(encoded) > MAX_ID_BYTES:
        raise WireError(f"{kind} is {len(encoded)} bytes; at most {MAX_ID_BYTES}")
    return encoded


@dataclass(frozen=True)
class ChannelKeys:
    """The AES-256 keys of one (job, client) channel: one per `Direction`, identical on both sides."""

    job_id: str
    client_id: str
    keys: Mapping[Direction, bytes] = field(repr=False)

    def key_for(self, direction: Direction) -> bytes:
        return self.keys[Direction(direction)]


def derive_channel_keys(
    own_private: X25519PrivateKey, peer_public: X25519PublicKey, job_id: str, client_id: str
) -> ChannelKeys:
    """X25519 shared secret → HKDF-SHA256 → one AES-256 key per direction of this (job, client).

    The client calls it with (its private key, the server's public key), the server with (its private
    key, the client's public key); both get the same keys. The salt binds both public keys (sorted, so
    it does not depend on who calls), the info binds job id, client id and direction, so every
    (job, client, direction) key is independent: learning one reveals nothing about any other.
    """
    job = _identifier("job_id", job_id)
    client = _identifier("client_id", client_id)
    try:
        shared = own_private.exchange(peer_public)
    except ValueError:
        # cryptography refuses low-order points, whose shared secret would be all zeros.
        raise KeyFormatError("peer public key is a low-order point; refusing the key agreement") from None
    raw_public = (
        own_private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        peer_public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    )
    salt = hashlib.sha256(PROTOCOL_LABEL + b"".join(sorted(raw_public))).digest()
    keys: dict[Direction, bytes] = {}
    for direction in Direction:
        info = b"".join(
            (
                PROTOCOL_LABEL,
                b" channel key",
                _length_prefixed(job),
                _length_prefixed(client),
                _length_prefixed(direction.value.encode("ascii")),
            )
        )
        keys[direction] = HKDF(algorithm=hashes.SHA256(), length=AES_KEY_BYTES, salt=salt, info=info).derive(
            shared
        )
    return ChannelKeys(job_id=job_id, client_id=client_id, keys=keys)
