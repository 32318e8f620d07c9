"""`flglm agent run --memory-log FILE`: this agent's resident memory at each phase, one JSON line per event.

Events: `started` (runtime imported), `loaded` (a job's client parts, data and optimizer ready), `step` (after
each training step, with its round, step and the job's global step index), `eval_start` / `eval_end` (around
a round's local evaluation), `job_closed` (a finished job's session released). Each line carries the wall
time `t`, `rss` and `peak` (VmHWM) in bytes. Only this process's own memory figures are written: nothing
about the data. `flglm bench memory` reads it to split a run into loading, training and evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flglm.process_memory import peak_resident_bytes, resident_bytes


class MemoryLog:
    """Appends memory events to `path`; a no-op without one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def event(self, event: str, **fields: int) -> None:
        """One line: the event, its numbers, and this process's resident and peak bytes now."""
        if self.path is None:
            return
        record = {"t": time.time(), "event": event, **fields}
        record |= {"rss": resident_bytes(), "peak": peak_resident_bytes()}
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
