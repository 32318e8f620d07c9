"""`create_app(settings)`: migrations, bootstrap admin, server key, limits, routes, housekeeping.

The backend imports neither the worker nor torch. What needs them is handed in by the app layer, the
composition root (`apps.server.create_server_app`, what `flglm serve` runs): the in-process dispatcher of
the embedded mode and the caller's half of the generate route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from backend.api.router import api_router
from backend.auth.service import ensure_bootstrap_admin
from backend.authenticate_first import AuthenticateFirst
from backend.db import create_db_engine, create_session_factory
from backend.errors import install_error_handlers
from backend.exports.sessions import CompletePrompts
from backend.housekeeping import run_housekeeping
from backend.jobs.after_commit import on_clients_dropped, on_jobs_finished, on_work_changed
from backend.jobs.work_signal import WorkSignal
from backend.limits import BodySizeLimit, TokenBucketLimiter
from backend.migrate import upgrade_to_head
from backend.models import utc_now
from backend.privacy.service import fail_orphaned_audits
from backend.protocol_version import ProtocolVersionCheck
from backend.security_headers import SecurityHeaders
from backend.server_keys import load_or_create_server_key, public_key_b64
from backend.settings import Settings, get_settings
from backend.steps.relay import InProcessDispatcherFactory, step_relay_from_settings
from backend.steps.service import publish_missing_specs, release_dropped_clients, release_job_replicas
from flglm.protocol import API_PREFIX
from flglm.wire.atomic_file import write_file_atomically

log = logging.getLogger(__name__)

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"


def create_app(
    settings: Settings | None = None,
    *,
    inprocess_dispatcher: InProcessDispatcherFactory | None = None,
    complete_prompts: CompletePrompts | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)  # keys, the admin token and the SQLite job store live here
    url = settings.resolved_database_url()
    if settings.run_migrations_on_start:
        upgrade_to_head(url)
    engine = create_db_engine(url)
    session_factory = create_session_factory(engine)
    with session_factory() as session, session.begin():
        new_admin_secret = ensure_bootstrap_admin(session, settings.bootstrap_admin_token)
        if settings.executor == "inprocess":  # its audits ran in the previous process, which is gone
            fail_orphaned_audits(session, utc_now())
    if new_admin_secret:
        _publish_admin_token(settings.data_dir / "admin_token", new_admin_secret)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync routes and dependencies run on this pool, one hop each, and a request's database connection
        # is held from its authentication to its commit, across hops. With fewer threads than requests in
        # flight, every thread can end up waiting for a connection held by a request that waits for a
        # thread: nothing moves until the pool times out (a 500). Threads are made on demand.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        task = None
        if settings.deadline_check_interval_s > 0:
            task = asyncio.create_task(_housekeeping_loop(app, settings))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            app.state.step_relay.close()
            engine.dispose()

    app = FastAPI(
        title="FL-GLM control plane",
        version="1",
        openapi_url="/openapi.json",
        # Swagger UI loads its script from a CDN, on the origin that holds the operator's token: off unless
        # FLGLM_API_DOCS=true (the OpenAPI document itself is always at /openapi.json).
        docs_url="/docs" if settings.api_docs else None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory
    app.state.rate_limiter = TokenBucketLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    server_key = load_or_create_server_key(settings.resolved_server_key_file())
    app.state.server_public_key_b64 = public_key_b64(server_key)
    step_relay = step_relay_from_settings(settings, server_key, inprocess_dispatcher)
    app.state.step_relay = step_relay
    app.state.complete_prompts = complete_prompts
    # A job that ended frees its server replicas on the workers once that end is committed.
    on_jobs_finished(session_factory, lambda job_ids: release_job_replicas(step_relay, job_ids))
    # A client dropped from its round stops holding the others' step on the replicas once that is committed.
    on_clients_dropped(session_factory, lambda drops: release_dropped_clients(step_relay, drops))
    # Agents' work long-polls wake when a commit changed their jobs.
    app.state.work_signal = WorkSignal()
    on_work_changed(session_factory, app.state.work_signal.bump)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    # Added last = runs first: headers on everything, then the protocol version, then the credential.
    app.add_middleware(AuthenticateFirst, session_factory=session_factory, limiter=app.state.rate_limiter)
    app.add_middleware(ProtocolVersionCheck)
    app.add_middleware(SecurityHeaders)
    app.include_router(api_router, prefix=API_PREFIX)
    if FRONTEND_DIR.is_dir():
        app.mount("/", StaticFiles(directory=FRONTEND_DIR, html=True), name="dashboard")
    return app


def _publish_admin_token(path: Path, secret: str) -> None:
    """The generated admin token is shown once on stderr and kept 0600 for the operator's CLI."""
    write_file_atomically(path, (secret + "\n").encode(), mode=0o600)
    print(f"flglm: created the admin API token (also in {path}):\n  {secret}", file=sys.stderr)


async def _housekeeping_loop(app: FastAPI, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.deadline_check_interval_s)
        try:
            await run_in_threadpool(
                run_housekeeping,
                app.state.session_factory,
                utc_now(),
                settings.heartbeat_lease_s,
                settings.job_keys_dir(),
                settings.job_key_retention_s,
                app.state.step_relay.store,
                settings.privacy_audit_queue_timeout_s,
                lambda session: publish_missing_specs(session, app.state.step_relay, settings),
            )
        except Exception:  # keep the loop alive; the next pass retries
            log.exception("housekeeping pass failed")
