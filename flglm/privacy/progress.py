"""Progress of a privacy audit on a terminal: one tqdm bar per stage (stderr), shared by CLI and demo."""

from __future__ import annotations

from typing import Any


class StageBars:
    """A tqdm bar on stderr per stage of the audit, replaced when the stage changes."""

    def __init__(self, enabled: bool, prefix: str = "") -> None:
        self._enabled = enabled
        self._prefix = prefix
        self._stage: str | None = None
        self._bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self._enabled:
            return
        from tqdm import tqdm

        if stage != self._stage or self._bar is None:
            self.close()
            self._stage = stage
            self._bar = tqdm(
                total=max(total, 1), desc=self._prefix + stage, unit="", leave=False, dynamic_ncols=True
            )
        self._bar.total = max(total, 1)
        self._bar.n = min(done, self._bar.total)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
