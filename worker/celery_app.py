"""The workers' Celery application: `flglm.contracts.dispatch.celery_app` with the worker-side settings.

`acks_late` with `task_reject_on_worker_lost`: a task whose worker dies is delivered again, which is safe
because every task body is idempotent (see worker.replica). Each replica queue must be consumed by one
worker process with the `solo` (or single `threads`) pool, because the autograd graph a forward leaves
in memory is needed by the backward that follows: prefork children would not share it.

`survive_broker_restart` works around a kombu defect (5.7.0): when Redis drops the connection (a restart),
closing the consumer's channel restores its unacknowledged messages through a connection kombu has already
cleared, the AttributeError escapes, and Celery stops the worker as "unrecoverable" (losing every replica
held in memory). Skipping that immediate restore lets the consumer reconnect; the messages stay in Redis's
unacked index and come back after the visibility timeout (when Redis restarted without persistence there
is nothing to restore: the agents resend what was lost).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

from flglm.contracts.dispatch import celery_app
from worker.settings import get_worker_settings

log = logging.getLogger(__name__)


def survive_broker_restart() -> None:
    """Patch kombu's Redis QoS so a consumer whose broker connection is already gone reconnects instead of
    crashing (idempotent)."""
    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "flglm_patched", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> None:
        if client is None and self.channel.connection.client is None:
            log.warning(
                "broker connection lost with %d unacknowledged task(s): they come back after the "
                "visibility timeout (or were lost with Redis's contents)",
                len(self._delivered),
            )
            return
        original(self, client)

    restore_unacked.flglm_patched = True  # type: ignore[attr-defined]
    setattr(kombu_redis.QoS, "restore_unacked", restore_unacked)  # noqa: B010 (mypy: no method assign)


survive_broker_restart()

settings = get_worker_settings()

app = celery_app(
    settings.redis_url,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_soft_time_limit=settings.task_soft_time_limit_s,
    task_time_limit=settings.task_time_limit_s,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
    result_expires=6 * 3600,
)
app.conf.include = ["worker.tasks"]
