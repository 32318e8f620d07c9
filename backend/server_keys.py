"""The deployment's X25519 key pair: one private key file (0600, made on first start) and its public half."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.wire.keys import generate_private_key, load_private_key, public_key_to_b64, save_private_key


def load_or_create_server_key(path: Path) -> X25519PrivateKey:
    """The same file the worker reads (`flglm.wire.keys` format: unencrypted PKCS#8 PEM, mode 0600)."""
    if not path.exists():
        save_private_key(generate_private_key(), path)
    return load_private_key(path)


def public_key_b64(private_key: X25519PrivateKey) -> str:
    return public_key_to_b64(private_key.public_key())
