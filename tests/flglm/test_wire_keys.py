"""Key pairs, key files and channel keys: equal on both sides, independent across everything else."""

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from flglm.wire.directions import Direction, Sender
from flglm.wire.errors import InsecureKeyFileError, KeyFormatError, WireError
from flglm.wire.keys import (
    ClientKeyPair,
    derive_channel_keys,
    generate_private_key,
    load_private_key,
    public_key_fingerprint,
    public_key_from_b64,
    public_key_to_b64,
    save_private_key,
)


def raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_client_and_server_derive_the_same_keys() -> None:
    client, server = ClientKeyPair.generate(), generate_private_key()
    on_client = derive_channel_keys(client.private_key, server.public_key(), "job-1", "client-a")
    on_server = derive_channel_keys(server, client.public_key, "job-1", "client-a")
    assert dict(on_client.keys) == dict(on_server.keys)
    assert set(on_client.keys) == set(Direction)
    assert all(len(key) == 32 for key in on_client.keys.values())


def test_every_direction_job_client_and_server_key_gives_independent_keys() -> None:
    client, server, other_server = generate_private_key(), generate_private_key(), generate_private_key()
    base = derive_channel_keys(client, server.public_key(), "job-1", "client-a")
    variants = [
        derive_channel_keys(client, server.public_key(), "job-2", "client-a"),
        derive_channel_keys(client, server.public_key(), "job-1", "client-b"),
        derive_channel_keys(client, other_server.public_key(), "job-1", "client-a"),
        # Length prefixes: moving a character between job and client ids must change the keys.
        derive_channel_keys(client, server.public_key(), "job-1c", "lient-a"),
    ]
    all_keys = list(base.keys.values()) + [key for v in variants for key in v.keys.values()]
    assert len(set(all_keys)) == len(all_keys)
    assert base.key_for(Direction.activations) != base.key_for(Direction.activations_result)


def test_each_direction_has_one_sender() -> None:
    assert Direction.activations.sender is Sender.client
    assert Direction.gradients.sender is Sender.client
    assert Direction.adapters_up.sender is Sender.client
    assert Direction.activations_result.sender is Sender.server
    assert Direction.gradients_result.sender is Sender.server
    assert Direction.adapters_down.sender is Sender.server


def test_keys_never_appear_in_repr() -> None:
    pair = ClientKeyPair.generate()
    keys = derive_channel_keys(pair.private_key, generate_private_key().public_key(), "job", "client")
    assert keys.key_for(Direction.activations).hex() not in repr(keys)
    assert repr(pair) == "ClientKeyPair()"


def test_public_key_base64_round_trip() -> None:
    public = generate_private_key().public_key()
    text = public_key_to_b64(public)
    assert len(text) == 44
    assert raw(public_key_from_b64(text)) == raw(public)
    assert public_key_fingerprint(public) == public_key_fingerprint(public_key_from_b64(text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64!", "base64"),
        ("AAAA", "3 bytes"),
        ("QUFB" * 11, "33 bytes"),
        (b"bytes-not-str", "string"),
    ],
)
def test_bad_public_keys_get_a_clear_error(text: object, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        public_key_from_b64(text)  # type: ignore[arg-type]


def test_low_order_public_key_is_refused_at_key_agreement() -> None:
    zero_point = X25519PublicKey.from_public_bytes(bytes(32))  # shared secret would be zero
    with pytest.raises(KeyFormatError, match="low-order"):
        derive_channel_keys(generate_private_key(), zero_point, "job", "client")


@pytest.mark.parametrize(("job_id", "client_id"), [("", "c"), ("j", ""), ("j" * 300, "c")])
def test_identifiers_are_validated(job_id: str, client_id: str) -> None:
    with pytest.raises(WireError):
        derive_channel_keys(generate_private_key(), generate_private_key().public_key(), job_id, client_id)


def test_private_key_file_is_0600_atomic_and_loads_back(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even with the most permissive umask the file must be 0600
    try:
        pair = ClientKeyPair.generate()
        path = tmp_path / "client.key"
        pair.save(path)
        ClientKeyPair.generate().save(path)  # overwrite goes through the same temp+rename path
        pair.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client.key"]  # no temp files left behind
    assert ClientKeyPair.load(path).public_b64 == pair.public_b64


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
def test_group_or_world_accessible_key_files_are_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "client.key"
    save_private_key(generate_private_key(), path)
    path.chmod(mode)
    with pytest.raises(InsecureKeyFileError, match="chmod 600"):
        load_private_key(path)


def test_symlinked_and_wrong_type_key_files_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    save_private_key(generate_private_key(), real)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(KeyFormatError, match="symbolic link"):
        load_private_key(link)

    ed = tmp_path / "ed.key"
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ed.write_bytes(pem)
    ed.chmod(0o600)
    with pytest.raises(KeyFormatError, match="not an X25519"):
        load_private_key(ed)

    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"hello")
    garbage.chmod(0o600)
    with pytest.raises(KeyFormatError, match="not an unencrypted PEM"):
        load_private_key(garbage)


def test_keys_load_without_torch_and_the_wire_package_without_server_frameworks() -> None:
    """The control plane derives nothing from tensors: keys and errors must not drag torch in; and the
    shared core must never import the server stack."""
    script = (
        "import sys\n"
        "import flglm.wire.keys, flglm.wire.errors, flglm.wire.sequence\n"
        "assert 'torch' not in sys.modules, 'torch imported by keys/errors/sequence'\n"
        "import flglm.wire, flglm.wire.envelope, flglm.wire.codec\n"
        "from flglm.wire import seal_tensor\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'fastapi', 'sqlalchemy', 'celery'})\n"
        "assert not bad, bad\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize(
    "raw",
    [
        bytes(32),  # all zeros
        bytes([1]) + bytes(31),  # the point of order 1
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    ],
)
def test_a_low_order_public_key_is_refused_where_it_enters(raw: bytes) -> None:
    """Such a key agrees on an all-zero secret with everyone: every later message of its owner would fail."""
    with pytest.raises(KeyFormatError, match="low-order"):
        public_key_from_b64(base64.b64encode(raw).decode())
