"""The deployment's X25519 key pair: one private key file (0600, made on first start) and its public half.

The file is the one `flglm.wire.keys.save_private_key` writes and `load_private_key` reads (unencrypted
PKCS#8 PEM, mode 0600, atomic), so the workers load the same file; `flglm.wire.keys` imports no torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flglm.wire.keys import generate_private_key, load_private_key, public_key_to_b64, save_private_key


def load_or_create_server_key(path: Path) -> X25519PrivateKey:
    """The key in `path`, created when missing; refuses a file others can access (InsecureKeyFileError).

    Processes starting together all end up with the one key that was created first.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process created it a moment ago: use theirs
            save_private_key(generate_private_key(), path, replace=False)
    return load_private_key(path)


def public_key_b64(private_key: X25519PrivateKey) -> str:
    """Raw 32-byte public key in standard base64, as the control plane publishes it."""
    return public_key_to_b64(private_key.public_key())
