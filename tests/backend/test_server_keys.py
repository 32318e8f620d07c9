"""The deployment's X25519 key file: created once 0600, shared by racing processes, refused when exposed."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backend.server_keys import load_or_create_server_key, public_key_b64
from flglm.wire.errors import InsecureKeyFileError
from flglm.wire.keys import load_private_key, public_key_from_b64


def test_the_key_is_created_once_0600_and_then_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "data" / "server_x25519.key"
    first = load_or_create_server_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_server_key(path)
    assert public_key_b64(again) == public_key_b64(first)
    assert public_key_b64(load_private_key(path)) == public_key_b64(first)  # the workers' loader
    public_key_from_b64(public_key_b64(first))  # the published half parses


def test_processes_starting_together_share_one_key(tmp_path: Path) -> None:
    path = tmp_path / "server_x25519.key"
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: public_key_b64(load_or_create_server_key(path)), range(16)))
    assert len(set(keys)) == 1
    assert sorted(os.listdir(tmp_path)) == ["server_x25519.key"]  # no temp files left behind


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "server_x25519.key"
    load_or_create_server_key(path)
    path.chmod(0o644)
    with pytest.raises(InsecureKeyFileError, match="0644"):
        load_or_create_server_key(path)
