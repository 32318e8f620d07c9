"""The deployment's X25519 key pair: one private key file (0600, made on first start) and its public half.

The file format is the one `flglm.wire.keys.save_private_key` writes and `load_private_key` reads
(unencrypted PKCS#8 PEM, mode 0600), so the workers load the same file. It is written here with
`cryptography` directly because importing `flglm.wire` pulls in torch, which the control plane does not need.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


class InsecureServerKeyFile(ValueError):
    pass


def load_or_create_server_key(path: Path) -> X25519PrivateKey:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InsecureServerKeyFile(f"{path} has mode {mode:04o}; the server's private key must be 0600")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, X25519PrivateKey):
        raise InsecureServerKeyFile(f"{path} holds a {type(key).__name__}, not an X25519 private key")
    return key


def public_key_b64(private_key: X25519PrivateKey) -> str:
    """Raw 32-byte public key in standard base64, as `flglm.wire.keys.public_key_to_b64` writes it."""
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")
