"""The workers' Celery application: `flglm.contracts.dispatch.celery_app` with the worker-side settings.

`acks_late` with `task_reject_on_worker_lost`: a task whose worker dies is delivered again, which is safe
because every task body is idempotent (see worker.replica). Each replica queue must be consumed by one
worker process with the `solo` (or single `threads`) pool, because the autograd graph a forward leaves
in memory is needed by the backward that follows: prefork children would not share it.
"""

from __future__ import annotations

from flglm.contracts.dispatch import celery_app
from worker.settings import get_worker_settings

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
