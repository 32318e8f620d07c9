"""The privacy-audit task: `flglm.privacy.audit.run_privacy_audit` on a worker, its progress and outcome in
the blob store (`flglm.contracts.privacy_records`) for the control plane to read."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from flglm.contracts.privacy_records import (
    HEARTBEAT_INTERVAL_S,
    AuditOutcome,
    AuditProgress,
    AuditRecords,
    short_error,
    short_stage,
)
from flglm.privacy.report import AuditRequest
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class _Heartbeat:
    """Keeps the newest progress record alive (re-written every `interval_s`) until `stop`."""

    def __init__(self, records: AuditRecords, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self._records = records
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._latest = AuditProgress(stage="starting", done=0, total=1, at=datetime.now(UTC))
        self._stopped = threading.Event()
        self._records.write_progress(self._latest)
        self._thread = threading.Thread(target=self._run, name="privacy-audit-heartbeat", daemon=True)
        self._thread.start()

    def update(self, stage: str, done: int, total: int) -> None:
        """The audit's `progress` callback: stage description, units done, units in that stage."""
        progress = AuditProgress(
            stage=short_stage(stage), done=max(0, done), total=max(0, total), at=datetime.now(UTC)
        )
        with self._lock:
            self._latest = progress
        self._records.write_progress(progress)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            with self._lock:
                latest = self._latest
            try:
                self._records.write_progress(latest)
            except Exception:  # a transient store error: the next beat tries again
                log.warning("privacy audit heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._interval_s + 5)


def run_privacy_audit_task(
    runtime: WorkerRuntime, *, task_key: str, request: dict[str, Any]
) -> dict[str, Any]:
    """Run one audit; its outcome (the `PrivacyAudit` JSON, or the error) is stored and returned.

    A second delivery of a finished audit answers the stored outcome without running it again.
    """
    from flglm.privacy.audit import run_privacy_audit  # torch and the attacks: only when an audit runs

    records = AuditRecords(runtime.store, task_key)
    finished = records.outcome()
    if finished is not None:
        return finished.model_dump(mode="json")
    records.mark_started()
    heartbeat = _Heartbeat(records)
    try:
        audit = run_privacy_audit(AuditRequest.model_validate(request), progress=heartbeat.update)
        outcome = AuditOutcome(status="completed", result=audit.model_dump(mode="json"))
    except Exception as exc:  # every failure ends as the audit's error message, never as a silent loss
        log.exception("privacy audit %s failed", task_key)
        outcome = AuditOutcome(status="failed", error=short_error(f"{type(exc).__name__}: {exc}"))
    try:
        records.write_outcome(outcome)  # before the heartbeat stops: see flglm.contracts.privacy_records
    finally:
        heartbeat.stop()
    return outcome.model_dump(mode="json")
