"""Settings of the control plane: one pydantic-settings `Settings` (env prefix `FLGLM_`), read once."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLGLM_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".flglm")
    # Empty means the embedded default: a SQLite file `<data_dir>/flglm.db`.
    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    executor: Literal["inprocess", "celery"] = "inprocess"
    # Step protocol: threads that long-polls wait in (each waiting request holds at most two, and a Redis
    # connection in each: 512 serves 256 agents waiting at once per backend process), how long an upload
    # waits for a worker to admit it, and where server replicas checkpoint (the workers' disk).
    step_wait_threads: int = Field(default=512, ge=4, le=10_000)
    # Threads for the sync routes and dependencies (anyio's default is 40): more than the requests that
    # can be in flight at once, so a request holding a database connection always finds one for its next hop.
    request_threads: int = Field(default=1024, ge=8, le=100_000)
    step_admission_timeout_s: float = 30.0
    # The longest this server holds an agent's work long-poll (`GET /agent/work?wait_s=`, a longer wait_s
    # is cut to it): below the idle timeout of any proxy in front of it; 0 answers at once.
    work_wait_max_s: float = Field(default=60.0, ge=0, le=60.0)
    checkpoint_dir: Path | None = None
    # The in-process executor's worker relay (`inprocess` only; Celery workers read the same variable,
    # FLGLM_REPLICA_IDLE_TTL_S): a replica unused this long is checkpointed and dropped from memory.
    replica_idle_ttl_s: float = 3600.0
    # Generation: how long a caller waits for a worker to open a session (loads the body) or run one call.
    generation_task_timeout_s: float = 120.0
    # A privacy audit that no worker started within this long is marked failed (no worker consumes its queue).
    privacy_audit_queue_timeout_s: float = Field(default=6 * 3600.0, gt=0)

    heartbeat_lease_s: float = 60.0
    # How often the app enforces round deadlines and heartbeat leases; 0 disables the loop (tests call it).
    deadline_check_interval_s: float = 5.0
    max_body_bytes: int = 16 * 1024 * 1024
    # Token buckets per client address and per credential on the auth, token and enrollment endpoints.
    rate_limit_per_minute: float = 30.0
    rate_limit_burst: int = 10
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (comma-separated addresses or
    # networks, e.g. "10.0.0.5,172.18.0.0/16"); none by default: the client address is the connection's.
    trusted_proxies: str = ""
    enrollment_token_ttl_s: float = 24 * 3600.0

    # A fixed admin token (e.g. from a secret store); when empty one is created on first start and
    # written 0600 to `<data_dir>/admin_token`.
    bootstrap_admin_token: str = ""
    server_key_file: Path | None = None
    # Each job's server private key (`<data_dir>/job-keys/job-<id>.key`) is deleted this long after the
    # job ended (forward secrecy); the agents' final evaluation of the last round runs within it.
    job_key_retention_s: float = Field(default=86400.0, ge=0)
    run_migrations_on_start: bool = True
    # Swagger UI at /docs (its script comes from a CDN, on the origin that holds the operator's token).
    api_docs: bool = False

    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'flglm.db'}"

    def resolved_checkpoint_dir(self) -> Path:
        return self.checkpoint_dir or self.data_dir / "checkpoints"

    def resolved_server_key_file(self) -> Path:
        return self.server_key_file or self.data_dir / "server_x25519.key"

    def job_keys_dir(self) -> Path:
        return self.data_dir / "job-keys"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
