"""The one line `flglm serve` and `flglm worker` print at start: which executor, stores and directories."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from backend.settings import Settings
    from worker.settings import WorkerSettings


def redact_url(url: str) -> str:
    """`url` with any password shown as ***, so the line can go to logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: say nothing of it rather than leak a secret
        return "<unparsed URL>"


def serve_banner(settings: Settings, address: str) -> str:
    """What this control plane runs with, as the operator would check it against their plan."""
    executor = settings.executor + (
        f" (Redis {redact_url(settings.redis_url)})"
        if settings.executor == "celery"
        else " (embedded worker)"
    )
    return (
        f"flglm serve: {address}; executor {executor}; database "
        f"{redact_url(settings.resolved_database_url())}; data dir {settings.data_dir}; "
        f"checkpoints {settings.resolved_checkpoint_dir()}"
    )


def worker_banner(settings: WorkerSettings, queues: list[str], device: str) -> str:
    """What this worker consumes and where it reads the shared key and runs its replicas."""
    return (
        f"flglm worker: Redis {redact_url(settings.redis_url)}; queues {', '.join(queues)}; device {device}; "
        f"server key {settings.resolved_server_key_file()}"
    )
