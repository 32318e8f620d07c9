"""Where a job's trained adapters lie on the checkpoint volume, and reading their tensors without torch.

The backend's export route imports this module (never `worker.checkpoints`, which loads torch). Layout under
a job's checkpoint directory (`WorkerJobSpec.checkpoint_dir`):

- server adapters: `replica_dir(...)/step-<n>.safetensors`, tensors `adapter/<body param>` (see
  `worker.checkpoints`, whose `replica_dir` is this one);
- global client adapters: `client-adapters/round-<n>.safetensors`, the plaintext FedAvg result of round n
  (front + back names), written by `worker.fedavg` so that the operator can export the whole model. This
  reveals the averaged client adapters to whoever can read the checkpoint volume: the operator, by design.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

CLIENT_ADAPTERS_DIRNAME = "client-adapters"
_STEP = re.compile(r"^step-(\d{10})\.safetensors$")
_ROUND = re.compile(r"^round-(\d{6})\.safetensors$")


def replica_dir(checkpoint_dir: str | Path, replica: int) -> Path:
    """A replica's checkpoints inside the job's own checkpoint directory (already per job)."""
    return Path(checkpoint_dir) / f"replica-{replica}"


def client_adapters_path(checkpoint_dir: str | Path, round_number: int) -> Path:
    return Path(checkpoint_dir) / CLIENT_ADAPTERS_DIRNAME / f"round-{round_number:06d}.safetensors"


def _newest(directory: Path, pattern: re.Pattern[str]) -> Path | None:
    if not directory.is_dir():
        return None
    files = sorted(p for p in directory.iterdir() if pattern.match(p.name))
    return files[-1] if files else None


def latest_server_checkpoint(checkpoint_dir: str | Path, replica: int = 0) -> Path | None:
    return _newest(replica_dir(checkpoint_dir, replica), _STEP)


def latest_client_adapters(checkpoint_dir: str | Path) -> Path | None:
    return _newest(Path(checkpoint_dir) / CLIENT_ADAPTERS_DIRNAME, _ROUND)


RawTensors = dict[str, tuple[dict[str, Any], bytes]]  # name -> ({"dtype", "shape"}, raw little-endian bytes)


def read_raw_safetensors(path: Path, prefix: str = "") -> RawTensors:
    """The tensors of a safetensors file whose names start with `prefix` (stripped), as raw bytes."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"{path} is not a safetensors file (header length {header_len})")
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]
    tensors: RawTensors = {}
    for name, info in header.items():
        if name == "__metadata__" or not name.startswith(prefix):
            continue
        start, end = info["data_offsets"]
        tensors[name[len(prefix) :]] = ({"dtype": info["dtype"], "shape": info["shape"]}, body[start:end])
    return tensors


def write_raw_safetensors(tensors: RawTensors, metadata: dict[str, str]) -> bytes:
    """One safetensors file from raw tensors (byte-exact copies; no torch needed)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        info, raw = tensors[name]
        header[name] = {**info, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)
