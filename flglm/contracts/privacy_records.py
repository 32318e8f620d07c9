"""A privacy audit's records in the blob store: its start, its progress (kept alive by a heartbeat), its end.

The audit task (`worker.privacy_audit`) writes them under the audit's random `task_key`; the control plane
(`backend.privacy.service.sync_audit`) reads them into the audit's row. Torch-free: the backend imports it.

The task writes the outcome *before* its heartbeat stops, so a reader that finds no outcome and then no
progress record knows the task stopped without finishing (killed, or its worker restarted).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from flglm.contracts.blob_store import BlobStore

HEARTBEAT_INTERVAL_S = 10.0
# The progress record expires this long after the last heartbeat: then the task is gone.
HEARTBEAT_TTL_S = 60.0
# The start marker and the outcome wait this long for the control plane to copy them into the audit's row.
OUTCOME_TTL_S = 7 * 24 * 3600.0
MAX_STAGE_CHARS = 200
MAX_ERROR_CHARS = 2000


class AuditProgress(BaseModel):
    """Where the audit is: `stage` (what it does now), `done` of `total` units of that stage."""

    stage: str = Field(max_length=MAX_STAGE_CHARS)
    done: int = Field(ge=0)
    total: int = Field(ge=0)
    at: datetime


class AuditOutcome(BaseModel):
    """The end of an audit: the `PrivacyAudit` JSON when it completed, the error message when it failed."""

    status: Literal["completed", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = Field(default=None, max_length=MAX_ERROR_CHARS)


def short_stage(stage: str) -> str:
    return stage if len(stage) <= MAX_STAGE_CHARS else stage[: MAX_STAGE_CHARS - 1] + "…"


def short_error(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"


class AuditRecords:
    """The records of one audit (`task_key`: a random hex string the control plane chose) in `store`."""

    def __init__(self, store: BlobStore, task_key: str) -> None:
        self._store = store
        self._prefix = f"privacy-audit:{task_key}:"

    def mark_started(self) -> None:
        self._store.replace(self._prefix + "started", b"1", OUTCOME_TTL_S)

    def started(self) -> bool:
        return self._store.get(self._prefix + "started") is not None

    def write_progress(self, progress: AuditProgress) -> None:
        self._store.replace(self._prefix + "progress", progress.model_dump_json().encode(), HEARTBEAT_TTL_S)

    def progress(self) -> AuditProgress | None:
        data = self._store.get(self._prefix + "progress")
        return None if data is None else AuditProgress.model_validate_json(data)

    def write_outcome(self, outcome: AuditOutcome) -> None:
        self._store.replace(self._prefix + "outcome", outcome.model_dump_json().encode(), OUTCOME_TTL_S)

    def outcome(self) -> AuditOutcome | None:
        data = self._store.get(self._prefix + "outcome")
        return None if data is None else AuditOutcome.model_validate_json(data)
