"""Safetensors checkpoints of one server replica: adapters, optimizer state and counters, written atomically.

File: `<job checkpoint_dir>/replica-<r>/step-<server_steps>.safetensors`, the job dir being
`<FLGLM_CHECKPOINT_DIR>/job-<job>`. Tensors are the body's trainable weights (`adapter/<name>`) and
the AdamW state (`optimizer/<param index>/<key>`); the safetensors metadata holds JSON for the counters,
the scheduler and the replay guard. Loading uses safetensors only (no pickle), and the newest file is the
one with the highest step number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

# Re-exported: the torch-free path rules are shared with the backend's export route.
from flglm.contracts.artifacts import replica_dir as replica_dir
from flglm.wire.atomic_file import write_file_atomically

FORMAT = "flglm-replica-checkpoint/1"
KEEP_LAST = 3
_NAME = re.compile(r"^step-(\d{10})\.safetensors$")


@dataclass
class ReplicaSnapshot:
    """Everything a replica needs to resume exactly where the checkpoint was taken."""

    server_steps: int
    adapters: dict[str, torch.Tensor]
    optimizer_state: dict[int, dict[str, torch.Tensor]]
    optimizer_param_groups: list[dict[str, Any]]
    scheduler_state: dict[str, Any]
    replay_guard: list[tuple[str, str, str, int]]
    applied: list[str]  # "round:step:client" of every client step already applied
    extra: dict[str, Any] = field(default_factory=dict)


def save_snapshot(directory: Path, snapshot: ReplicaSnapshot) -> Path:
    """Write `snapshot` as step-<n>.safetensors (tmp + fsync + rename) and prune older files."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        f"adapter/{name}": tensor.detach().cpu().contiguous() for name, tensor in snapshot.adapters.items()
    }
    for index, state in snapshot.optimizer_state.items():
        for key, value in state.items():
            tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "server_steps": str(snapshot.server_steps),
        "param_groups": json.dumps(snapshot.optimizer_param_groups),
        "scheduler": json.dumps(snapshot.scheduler_state),
        "replay_guard": json.dumps(snapshot.replay_guard),
        "applied": json.dumps(snapshot.applied),
        "extra": json.dumps(snapshot.extra),
    }
    path = directory / f"step-{snapshot.server_steps:010d}.safetensors"
    write_file_atomically(path, save(tensors, metadata=metadata), mode=0o640)
    for old in list_checkpoints(directory)[:-KEEP_LAST]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files of one replica, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_snapshot(path: Path) -> ReplicaSnapshot:
    """Read a checkpoint written by `save_snapshot`; a foreign or damaged file is a ValueError."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a replica checkpoint (format {metadata.get('format')!r})")
    tensors = load_file(str(path))
    adapters = {name[len("adapter/") :]: t for name, t in tensors.items() if name.startswith("adapter/")}
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            optimizer_state.setdefault(int(index), {})[key] = tensor
    return ReplicaSnapshot(
        server_steps=int(metadata["server_steps"]),
        adapters=adapters,
        optimizer_state=optimizer_state,
        optimizer_param_groups=json.loads(metadata["param_groups"]),
        scheduler_state=json.loads(metadata["scheduler"]),
        replay_guard=[tuple(entry) for entry in json.loads(metadata["replay_guard"])],  # type: ignore[misc]
        applied=list(json.loads(metadata["applied"])),
        extra=json.loads(metadata["extra"]),
    )


def latest_snapshot(directory: Path) -> ReplicaSnapshot | None:
    files = list_checkpoints(directory)
    return load_snapshot(files[-1]) if files else None
