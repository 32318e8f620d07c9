"""Wakes the agents' work long-polls (`GET /agent/work?wait_s=…`) when a commit may have changed their work.

A commit that changes a job's status, opens one of its rounds or drops one of its clients notes the job
(`backend.jobs.after_commit.note_work_changed`); after it commits, `WorkSignal.bump` wakes the long-polls
of that job's participants, which read their work again. A long-poll waits for the jobs it knows of, so a
job it was never part of wakes nobody; its own `wait_s` bounds the delay of anything this process did not
see (another backend process's commit).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable


class WorkSignal:
    """A global epoch and, per job, the epoch of its last change; async waiters on some jobs' changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._changed_at: dict[int, int] = {}  # job id -> epoch of its last bump
        self._waiters: dict[int, set[asyncio.Future[None]]] = {}
        self._loops: dict[asyncio.Future[None], asyncio.AbstractEventLoop] = {}

    @property
    def epoch(self) -> int:
        """Read before reading the work; a later `wait(…, since=epoch)` returns at once if it changed."""
        with self._lock:
            return self._epoch

    def bump(self, job_ids: Iterable[int]) -> None:
        """These jobs' work changed (called after the commit, from any thread): wake their waiters."""
        woken: set[asyncio.Future[None]] = set()
        with self._lock:
            self._epoch += 1
            for job_id in job_ids:
                self._changed_at[job_id] = self._epoch
                woken |= self._waiters.pop(job_id, set())
            loops = [(self._loops.pop(future, None), future) for future in woken]
        for loop, future in loops:
            if loop is not None:
                loop.call_soon_threadsafe(_resolve, future)

    async def wait(self, job_ids: Iterable[int], since: int, timeout_s: float) -> None:
        """Until one of `job_ids` changed after epoch `since`, or `timeout_s` passed."""
        jobs = set(job_ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if any(self._changed_at.get(job_id, 0) > since for job_id in jobs):
                return
            for job_id in jobs:
                self._waiters.setdefault(job_id, set()).add(future)
            self._loops[future] = loop
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._loops.pop(future, None)
                for job_id in jobs:
                    waiting = self._waiters.get(job_id)
                    if waiting is not None:
                        waiting.discard(future)
                        if not waiting:
                            del self._waiters[job_id]

    def waiting(self) -> int:
        """How many long-polls wait now (for tests and the load benchmark)."""
        with self._lock:
            return len(self._loops)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
