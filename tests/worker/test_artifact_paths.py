"""The torch-free artifact layout: client-adapter files, newest-file lookup, raw safetensors round trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from flglm.contracts.artifacts import (
    latest_client_adapters,
    latest_server_checkpoint,
    read_raw_safetensors,
    write_raw_safetensors,
)
from worker.checkpoints import ReplicaSnapshot, replica_dir, save_snapshot
from worker.fedavg import save_global_client_adapters


def test_newest_round_and_step_are_found(tmp_path: Path) -> None:
    assert latest_client_adapters(tmp_path) is None and latest_server_checkpoint(tmp_path) is None
    for round_number in (2, 10, 9):
        save_global_client_adapters(
            str(tmp_path), round_number, {"front.a": torch.full((2,), float(round_number))}
        )
    newest = latest_client_adapters(tmp_path)
    assert newest is not None and newest.name == "round-000010.safetensors"
    assert newest.stat().st_mode & 0o777 == 0o640
    for step in (5, 12):
        save_snapshot(
            replica_dir(tmp_path, 0), ReplicaSnapshot(step, {"w": torch.ones(1)}, {}, [], {}, [], [])
        )
    server = latest_server_checkpoint(tmp_path)
    assert server is not None and server.name == "step-0000000012.safetensors"


def test_raw_round_trip_is_byte_exact_for_every_dtype(tmp_path: Path) -> None:
    tensors = {
        "adapter/a": torch.randn(3, 4),
        "adapter/b": torch.randn(5).to(torch.bfloat16),
        "optimizer/0/exp_avg": torch.randn(2),
    }
    path = tmp_path / "x.safetensors"
    path.write_bytes(save(tensors, metadata={"k": "v"}))
    raw = read_raw_safetensors(path, "adapter/")
    assert set(raw) == {"a", "b"}
    rebuilt = load(write_raw_safetensors(raw, {"format": "t"}))
    assert torch.equal(rebuilt["a"], tensors["adapter/a"]) and torch.equal(rebuilt["b"], tensors["adapter/b"])
    assert rebuilt["b"].dtype == torch.bfloat16


def test_not_a_safetensors_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_raw_safetensors(path)


def test_export_route_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import backend.exports.endpoints, backend.exports.service, flglm.contracts.artifacts\n"
        "assert 'torch' not in sys.modules, 'the export route imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
