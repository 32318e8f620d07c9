"""Settings of a worker process (env prefix FLGLM_, the same names as the backend's), read once."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLGLM_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".flglm")
    # The server's X25519 private key, shared with the backend (same default path as the backend's).
    server_key_file: Path | None = None
    task_soft_time_limit_s: float = 540.0
    task_time_limit_s: float = 600.0
    task_max_retries: int = 3  # retries of a task that failed on a transient error (Redis unreachable)
    task_max_deliveries: int = 3  # a task redelivered more often (it keeps killing workers) is dropped
    # Redis redelivers an unacknowledged task (its worker died) after this long; above the time limit.
    broker_visibility_timeout_s: float = 900.0
    # Generation sessions (worker.generation): dropped after this long unused, and beyond this many (LRU).
    generation_session_ttl_s: float = 300.0
    generation_max_sessions: int = 8
    # A job's replica unused this long (holding no step in flight) is checkpointed and dropped from memory:
    # the safety net behind the backend's release task (`flglm.release_job`) when a job ends.
    replica_idle_ttl_s: float = 3600.0
    # `flglm worker --replica auto`: who holds a slot lease (default: the hostname, i.e. the container) and
    # how long a lease outlives its last heartbeat (renewed every third of it).
    worker_identity: str | None = None
    slot_lease_ttl_s: float = 30.0
    # Force the torch device ("cpu", "cuda:1"); default: GPU slot % GPU count, or the CPU without a GPU.
    worker_device: str | None = None

    def resolved_server_key_file(self) -> Path:
        return self.server_key_file or self.data_dir / "server_x25519.key"


@lru_cache(maxsize=1)
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
