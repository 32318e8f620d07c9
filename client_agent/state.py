"""The agent's state directory: credential and X25519 key (0600), local consents, job checkpoints.

Layout (default `~/.flglm-agent`, or `--state-dir` / `FLGLM_AGENT_STATE`):
  credential.json             server URL, CA path, client id, name, bearer credential, server public key
  client_key.pem              the agent's X25519 private key (never leaves this directory)
  approved.json               job ids the owner approved through this agent (the runner works on no other)
  jobs/<id>/position.json     round, next step, phase of the round end
  jobs/<id>/adapters.safetensors, jobs/<id>/optimizer.pt   client adapters and optimizer state
  jobs/<id>/global_round_<r>.safetensors  the FedAvg'd client adapters after round r
  jobs/<id>/private_seed      private_front jobs: the seed of this owner's input-block adapters (never sent)
  sequence                    the persisted message sequence counter (never reused after a restart)
Every file is written atomically (temp file + rename) so a SIGKILL leaves the previous version intact.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATE_ENV = "FLGLM_AGENT_STATE"
DEFAULT_STATE_DIR = "~/.flglm-agent"
CREDENTIAL_FILE = "credential.json"
PRIVATE_KEY_FILE = "client_key.pem"
APPROVED_FILE = "approved.json"


class StateError(RuntimeError):
    """The state directory is missing something (not enrolled) or holds an unreadable file."""


def _write_atomically(path: Path, data: bytes) -> None:
    # flglm.wire.atomic_file is torch-free; imported lazily so `flglm agent status` stays light.
    from flglm.wire.atomic_file import write_file_atomically

    write_file_atomically(path, data, mode=0o600)


def resolve_state_dir(state_dir: str | Path | None) -> Path:
    """`--state-dir`, else $FLGLM_AGENT_STATE, else ~/.flglm-agent; created 0700."""
    chosen = state_dir or os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR
    path = Path(chosen).expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@dataclass
class Enrollment:
    server_url: str
    client_id: int
    name: str
    credential: str
    server_public_key: str
    ca_cert: str | None = None


def save_enrollment(state_dir: Path, enrollment: Enrollment) -> None:
    _write_atomically(state_dir / CREDENTIAL_FILE, json.dumps(asdict(enrollment), indent=2).encode())


def load_enrollment(state_dir: Path) -> Enrollment:
    path = state_dir / CREDENTIAL_FILE
    if not path.is_file():
        raise StateError(f"{path} does not exist: run `flglm agent enroll` first")
    try:
        return Enrollment(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise StateError(f"{path} is not a valid agent credential file: {exc}") from exc


def private_key_path(state_dir: Path) -> Path:
    return state_dir / PRIVATE_KEY_FILE


def approved_jobs(state_dir: Path) -> set[int]:
    path = state_dir / APPROVED_FILE
    if not path.is_file():
        return set()
    return {int(job_id) for job_id in json.loads(path.read_text(encoding="utf-8"))}


def record_decision(state_dir: Path, job_id: int, approved: bool) -> None:
    jobs = approved_jobs(state_dir)
    jobs = jobs | {job_id} if approved else jobs - {job_id}
    _write_atomically(state_dir / APPROVED_FILE, json.dumps(sorted(jobs)).encode())


@dataclass
class RoundPosition:
    """Where the agent is in a job: `next_step` of `round_number`; `phase` is "steps", "uploaded" (its
    adapters are on the server) or "done" (round-done reported, waiting for FedAvg)."""

    round_number: int = 1
    next_step: int = 0
    phase: str = "steps"


class JobCheckpoint:
    """One job's resumable state under `jobs/<id>/`."""

    def __init__(self, state_dir: Path, job_id: int) -> None:
        self.directory = state_dir / "jobs" / str(job_id)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def sequence_path(self) -> Path:
        return self.directory / "sequence"

    @property
    def adapters_path(self) -> Path:
        return self.directory / "adapters.safetensors"

    def position(self) -> RoundPosition | None:
        path = self.directory / "position.json"
        if not path.is_file():
            return None
        return RoundPosition(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, position: RoundPosition, adapters: dict[str, Any], optimizer_state: Any) -> None:
        """Adapters and optimizer first, position last: a kill in between resumes from the older position
        with newer weights at worst for one step, never with a position ahead of its weights."""
        import torch
        from safetensors.torch import save as save_safetensors

        _write_atomically(
            self.adapters_path, save_safetensors({k: v.contiguous() for k, v in adapters.items()})
        )
        buffer = io.BytesIO()
        torch.save(optimizer_state, buffer)
        _write_atomically(self.directory / "optimizer.pt", buffer.getvalue())
        self.save_position(position)

    @property
    def unsent_metric_path(self) -> Path:
        return self.directory / "unsent_metric.json"

    def save_unsent_metric(self, metric: dict[str, Any]) -> None:
        """A step metric about to be posted, kept until the server has it (resent after a crash)."""
        _write_atomically(self.unsent_metric_path, json.dumps(metric).encode())

    def unsent_metric(self) -> dict[str, Any] | None:
        path = self.unsent_metric_path
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def clear_unsent_metric(self) -> None:
        self.unsent_metric_path.unlink(missing_ok=True)

    def save_position(self, position: RoundPosition) -> None:
        _write_atomically(self.directory / "position.json", json.dumps(asdict(position)).encode())

    def global_adapters_path(self, round_number: int) -> Path:
        return self.directory / f"global_round_{round_number}.safetensors"

    def save_global_adapters(self, round_number: int, adapters: dict[str, Any]) -> None:
        """Keep the FedAvg'd client adapters of every round (the owner's copy of the joint model's ends)."""
        from safetensors.torch import save as save_safetensors

        data = save_safetensors({k: v.contiguous() for k, v in adapters.items()})
        _write_atomically(self.global_adapters_path(round_number), data)

    @property
    def private_seed_path(self) -> Path:
        return self.directory / "private_seed"

    def private_seed(self) -> int:
        """This owner's private seed for the job's input block: drawn once from the OS's randomness, then
        read back, so a restarted agent rebuilds the same block. It is never sent anywhere."""
        path = self.private_seed_path
        if path.is_file():
            try:
                return int(path.read_text(encoding="utf-8").strip())
            except ValueError as exc:
                raise StateError(f"{path} is not a seed: {exc}") from exc
        seed = secrets.randbits(63)
        _write_atomically(path, str(seed).encode())
        return seed

    def load_adapters(self) -> dict[str, Any]:
        from safetensors.torch import load

        return load(self.adapters_path.read_bytes())

    def load_optimizer_state(self) -> Any:
        import torch

        # Our own file, still loaded with weights_only=True (no pickled code runs).
        return torch.load(self.directory / "optimizer.pt", weights_only=True)
