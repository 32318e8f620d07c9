"""The deployment's X25519 key pair: one private key file (0600, made on first start) and its public half.

Uses `flglm.wire.keys` when it is present so the worker and the wire format read the same file; otherwise it
writes an unencrypted PKCS#8 PEM with `cryptography` directly.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


def load_or_create_server_key(path: Path) -> X25519PrivateKey:
    try:
        from flglm.wire import keys as wire_keys
    except ImportError:
        wire_keys = None  # type: ignore[assignment]
    if wire_keys is not None:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            wire_keys.save_private_key(wire_keys.generate_private_key(), path)
            os.chmod(path, 0o600)
        key: X25519PrivateKey = wire_keys.load_private_key(path)
        return key
    if path.exists():
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, X25519PrivateKey):
            raise ValueError(f"{path} does not hold an X25519 private key")
        return loaded
    private_key = X25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return private_key


def public_key_b64(private_key: X25519PrivateKey) -> str:
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()
