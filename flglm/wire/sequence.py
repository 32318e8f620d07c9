"""Sequence numbers: a sender's crash-safe increasing counter and a receiver's replay guard."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from flglm.wire.atomic_file import write_file_atomically
from flglm.wire.directions import Direction
from flglm.wire.errors import DecodeError, ReplayError

MAX_SEQUENCE = 2**63 - 1


class SequenceCounter:
    """Strictly increasing sequence numbers for one sender, persisted by reserving blocks ahead of use.

    The file records the end of the reserved block *before* any number of it is handed out, so after
    a crash the counter resumes above every number that may have been used (skipping the unused rest
    of the block): a restarted client can never send a sequence number its receiver has already seen.
    One counter per client agent serves all its jobs and directions (every per-direction subsequence
    of an increasing sequence is increasing).
    """

    def __init__(self, path: str | os.PathLike[str], *, reserve: int = 1024) -> None:
        if reserve < 1:
            raise ValueError("reserve must be at least 1")
        self._path = Path(path)
        self._reserve = reserve
        self._lock = threading.Lock()
        self._next = self._read_reserved_until()
        self._reserved_until = self._next

    def _read_reserved_until(self) -> int:
        if not self._path.exists():
            return 1
        try:
            value = json.loads(self._path.read_text(encoding="utf-8"))["reserved_until"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"sequence file {self._path} is corrupt ({exc}); refusing to guess") from None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQUENCE:
            raise DecodeError(f"sequence file {self._path} holds an invalid value {value!r}")
        return value

    def next(self) -> int:
        """The next sequence number; persists a new reservation first when the current block is spent."""
        with self._lock:
            if self._next >= self._reserved_until:
                reserved_until = self._next + self._reserve
                if reserved_until > MAX_SEQUENCE:
                    raise ReplayError("sequence numbers exhausted")
                write_file_atomically(self._path, json.dumps({"reserved_until": reserved_until}).encode())
                self._reserved_until = reserved_until
            value = self._next
            self._next += 1
            return value


class SequencedHeader(Protocol):
    """What a replay guard reads from an authenticated envelope header."""

    @property
    def job_id(self) -> str: ...
    @property
    def client_id(self) -> str: ...
    @property
    def direction(self) -> Direction: ...
    @property
    def sequence(self) -> int: ...


class SequenceGuard(Protocol):
    """Receiver-side check: `accept` records the header's sequence or raises `ReplayError`, atomically.

    `ReplayGuard` is the in-process implementation (client agents, tests, a single worker); a
    replicated backend implements the same contract on shared storage (one compare-and-set per
    message in Redis or SQL) so that every replica sees every accepted sequence.
    """

    def accept(self, header: SequencedHeader, digest: str = "") -> None:
        """With a `digest` of the message's bytes, the same sequence with the same digest passes again."""
        ...


StreamKey = tuple[str, str, Direction]


class ReplayGuard:
    """Accepts a message only if its sequence is strictly above the last accepted one of its stream.

    A stream is one (job, client, direction). Call `accept` only after the message authenticated,
    so forged headers can never advance (and thereby block) a stream. State is a JSON-able list and
    can be saved atomically; restore it on restart or a replay would be accepted again.
    """

    def __init__(self, last_accepted: Iterable[tuple[str, str, str, int]] = ()) -> None:
        self._lock = threading.Lock()
        self._last: dict[StreamKey, int] = {}
        self._digests: dict[StreamKey, str] = {}  # of the last accepted message, when the caller gave one
        for job_id, client_id, direction, sequence in last_accepted:
            self._last[(job_id, client_id, Direction(direction))] = int(sequence)

    def last_sequence(self, job_id: str, client_id: str, direction: Direction) -> int | None:
        return self._last.get((job_id, client_id, Direction(direction)))

    def accept(self, header: SequencedHeader, digest: str = "") -> None:
        """Record the sequence, or raise `ReplayError`. With a `digest` of the message, the same sequence with
        the same digest is accepted again (an identical retry: the same message, not a replay)."""
        key = (header.job_id, header.client_id, Direction(header.direction))
        with self._lock:
            last = self._last.get(key)
            if digest and last == header.sequence and self._digests.get(key) == digest:
                return
            if last is not None and header.sequence <= last:
                raise ReplayError(
                    f"{header.direction} message {header.sequence} of job {header.job_id!r}, client "
                    f"{header.client_id!r} is not after the last accepted one ({last}): replayed or reordered"
                )
            self._last[key] = header.sequence
            self._digests[key] = digest

    def forget_job(self, job_id: str) -> None:
        """Drop a finished job's streams (its keys are never used again, so nothing can be replayed)."""
        with self._lock:
            for key in [key for key in self._last if key[0] == job_id]:
                del self._last[key]
                self._digests.pop(key, None)

    def state(self) -> list[tuple[str, str, str, int]]:
        with self._lock:
            return [
                (job, client, direction.value, seq) for (job, client, direction), seq in self._last.items()
            ]

    def save(self, path: str | os.PathLike[str]) -> None:
        write_file_atomically(path, json.dumps(self.state()).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReplayGuard:
        """Guard saved by `save`; a missing file is a fresh guard, a corrupt one an error."""
        if not Path(path).exists():
            return cls()
        try:
            entries = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls((str(j), str(c), str(d), int(s)) for j, c, d, s in entries)
        except (ValueError, TypeError) as exc:
            raise DecodeError(f"replay-guard file {path} is corrupt: {exc}") from None
