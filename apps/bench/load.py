"""`flglm bench load`: does one control-plane process hold N agents' traffic? Per-route latency and errors.

One `flglm serve --self-signed` subprocess on PostgreSQL (a fresh schema, dropped afterwards) with the
Celery executor (Redis, a database of its own) and one `flglm worker --replica 0` subprocess serving the
admissions. N simulated agents (asyncio, one `httpx.AsyncClient` each, HTTPS against the generated CA)
enroll, approve one `client_batch` job (tiny Llama) and then, for `seconds`, do what `flglm agent run` does
(its default cadence, `flglm.protocol.AGENT_*`, unless the options say otherwise):

- heartbeat (`POST /agent/heartbeat`) every `heartbeat_s`,
- ask for their work (`GET /agent/work?wait_s=work_wait_s`: it answers at once with the open round), then
  upload one sealed forward (`PUT …/activations/1`, admitted by the worker) and long-poll its result
  (`GET …/activations/1/result?wait_s=…`) for the rest of the run.

`idle_agents` more are enrolled and heartbeat but are in no job: their work long-polls wait `work_wait_s`
(then a pause of `poll_s`), as an agent between jobs does. With `work_wait_s` 0 every agent polls its work
every `poll_s` instead, without waiting (the agents before work long-polls; the stress profile).

One more enrolled participant (the holdout) approves the job and heartbeats but never uploads, so the
job's first batch waits for it (`batch_window_s` = one hour) and every long-poll ends in 204 after its
`wait_s`: the waiting requests pile up, which is the load under test. An operator polls the job page's
routes (`GET /jobs/{id}`, `/jobs/{id}/rounds`, `/metrics/jobs/{id}/progress`) every `operator_s`.

Latencies are measured by the load generator, on the same machine (its own scheduling delay included).
An error is any answer other than the route's expected status (heartbeat/work/operator 200, upload 201,
long-poll 204) or a transport error; a 5xx is always one. Peak RSS is the serve process's VmHWM.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import ssl
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from apps.bench.stack import ServedBackend, serve_subprocesses
from flglm.process_memory import peak_resident_bytes
from flglm.protocol import AGENT_HEARTBEAT_S, AGENT_POLL_S, AGENT_WORK_WAIT_S, MAX_WORK_WAIT_S
from flglm.step_protocol import MAX_LONG_POLL_S

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/11"  # a database of its own (stack bench: 13, tests: 15)
ADMIN_TOKEN = "bench-load-admin-token-0123456789abcdef"
MODEL_REF = "tiny:llama:0"
ROWS, SEQ = 1, 8  # one sealed forward per agent: (1, 8, hidden) float32 and its mask
TARGETS = {"agents": 200, "p99_ms_non_waiting": 50.0, "errors": 0}

# Route name -> (kind, expected status). "plain" routes carry the p99 target; the upload waits for the
# worker's admission and the long-polls for their `wait_s`, so none of those does.
ROUTES: dict[str, tuple[str, int]] = {
    "POST /agent/heartbeat": ("plain", 200),
    "GET /agent/work": ("plain", 200),
    "GET /agent/work?wait_s (idle agents)": ("long_poll", 200),
    "PUT /agent/jobs/{id}/rounds/{r}/steps/{s}/activations/{seq}": ("admission", 201),
    "GET /agent/jobs/{id}/rounds/{r}/steps/{s}/activations/{seq}/result": ("long_poll", 204),
    "GET /jobs/{id}": ("plain", 200),
    "GET /jobs/{id}/rounds": ("plain", 200),
    "GET /metrics/jobs/{id}/progress": ("plain", 200),
}
HEARTBEAT, WORK, IDLE_WORK, UPLOAD, RESULT, JOB, ROUNDS, PROGRESS = ROUTES


@dataclass(frozen=True)
class LoadBenchConfig:
    agents: int = 200
    idle_agents: int = 50
    seconds: float = 60.0
    heartbeat_s: float = AGENT_HEARTBEAT_S
    work_wait_s: float = AGENT_WORK_WAIT_S  # 0: poll the work every poll_s without waiting
    poll_s: float = AGENT_POLL_S
    wait_s: float = MAX_LONG_POLL_S  # of each step-result long-poll, as the agent's
    operator_s: float = 1.5
    database_url: str = ""  # empty: FLGLM_DATABASE_URL, else DEFAULT_DATABASE_URL

    def __post_init__(self) -> None:
        if self.agents < 1 or self.idle_agents < 0 or self.seconds <= 0:
            raise ValueError("agents must be >= 1, idle_agents >= 0 and seconds > 0")
        if min(self.heartbeat_s, self.poll_s, self.wait_s, self.operator_s) <= 0:
            raise ValueError("intervals and wait_s must be > 0")
        if not 0 <= self.work_wait_s <= MAX_WORK_WAIT_S:
            raise ValueError(f"work_wait_s must be within 0..{MAX_WORK_WAIT_S:g}")


@dataclass
class RouteStats:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    overshoot_ms: list[float] = field(default_factory=list)  # long-polls: answered this long after wait_s
    error_samples: list[str] = field(default_factory=list)


class Recorder:
    """Per-route latencies, statuses and errors of every request the bench makes in the timed window."""

    def __init__(self) -> None:
        self.routes = {name: RouteStats() for name in ROUTES}

    async def call(
        self,
        route: str,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        wait_s: float = 0.0,
        **kwargs: Any,
    ) -> httpx.Response | None:
        stats = self.routes[route]
        expected = ROUTES[route][1]
        start = time.perf_counter()
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            stats.latencies_ms.append((time.perf_counter() - start) * 1e3)
            stats.statuses[type(exc).__name__] += 1
            self._error(stats, f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        latency_ms = (time.perf_counter() - start) * 1e3
        stats.latencies_ms.append(latency_ms)
        if wait_s:
            stats.overshoot_ms.append(latency_ms - wait_s * 1e3)
        stats.statuses[str(response.status_code)] += 1
        if response.status_code != expected:
            self._error(stats, f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
        return response

    @staticmethod
    def _error(stats: RouteStats, message: str) -> None:
        stats.errors += 1
        if len(stats.error_samples) < 5:
            stats.error_samples.append(message)

    def totals(self) -> tuple[int, int]:
        return (
            sum(len(s.latencies_ms) for s in self.routes.values()),
            sum(s.errors for s in self.routes.values()),
        )


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# ---- the backend ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchWorkspace:
    """Where a bench runs: a fresh PostgreSQL schema and a directory for its logs."""

    database_url: str  # the fresh schema's URL
    schema: str
    root: Path


@contextmanager
def bench_workspace(configured_url: str, bench: str, work_dir: Path | None) -> Iterator[BenchWorkspace]:
    """A fresh schema on `configured_url` (else FLGLM_DATABASE_URL, else the local test database), dropped
    afterwards, and `work_dir` (else a temporary directory, removed afterwards)."""
    from backend.db import drop_postgres_schema, fresh_postgres_schema

    server_url = configured_url or os.environ.get("FLGLM_DATABASE_URL") or DEFAULT_DATABASE_URL
    schema = f"flglm_bench_{bench}_{uuid.uuid4().hex[:10]}"
    database_url = fresh_postgres_schema(server_url, schema)
    try:
        with tempfile.TemporaryDirectory(prefix=f"flglm-bench-{bench}-") as scratch:
            root = work_dir or Path(scratch)
            root.mkdir(parents=True, exist_ok=True)
            yield BenchWorkspace(database_url, schema, root)
    finally:
        drop_postgres_schema(server_url, schema)


@contextmanager
def running_backend(
    work_dir: Path,
    database_url: str,
    redis_url: str = REDIS_URL,
    name: str = "load",
    executor: str = "celery",
) -> Iterator[ServedBackend]:
    """`flglm serve --self-signed` on `database_url` and one `flglm worker --replica 0`, Celery on Redis
    (`redis_url`, flushed before and after); `name` tells this bench's worker node apart. With `executor`
    "inprocess" the body runs inside `flglm serve` and no worker is started."""
    import redis

    data_dir = work_dir / "backend"
    redis.Redis.from_url(redis_url).flushdb()  # queues, blobs and replay guards of an earlier run go
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "FLGLM_DATA_DIR": str(data_dir),
        "FLGLM_DATABASE_URL": database_url,
        "FLGLM_EXECUTOR": executor,
        "FLGLM_REDIS_URL": redis_url,
        "FLGLM_BOOTSTRAP_ADMIN_TOKEN": ADMIN_TOKEN,
        # The bench enrolls every agent from one address: the enrollment limits would refuse it.
        "FLGLM_RATE_LIMIT_BURST": "100000",
        "FLGLM_RATE_LIMIT_PER_MINUTE": "1000000",
    }
    worker = ["--replica", "0", "--loglevel", "warning", "--hostname", f"flglm-bench-{name}-r0@%h"]
    try:
        workers = [worker] if executor == "celery" else []
        with serve_subprocesses(work_dir, data_dir, env, workers) as served:
            yield served
    finally:
        redis.Redis.from_url(redis_url).flushdb()


# ---- setup: agents, the job, their sealed forwards -------------------------------------------------


@dataclass
class SimAgent:
    index: int
    name: str
    client_id: int
    credential: str
    keypair: Any  # flglm.wire.keys.ClientKeyPair
    upload_path: str = ""
    sealed: bytes = b""


async def _ok(client: httpx.AsyncClient, method: str, path: str, status: int, **kwargs: Any) -> Any:
    response = await client.request(method, path, **kwargs)
    if response.status_code != status:
        raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
    return response.json() if response.content else None


async def _enroll(admin: httpx.AsyncClient, anonymous: httpx.AsyncClient, index: int, name: str) -> SimAgent:
    from flglm.protocol import ENROLL_PATH
    from flglm.wire.keys import ClientKeyPair

    keypair = ClientKeyPair.generate()
    token = (await _ok(admin, "POST", "/clients/enrollment-tokens", 201, json={"name": name}))["token"]
    body = await _ok(
        anonymous,
        "POST",
        ENROLL_PATH,
        201,
        json={"token": token, "public_key": keypair.public_b64, "example_count": 1},
    )
    return SimAgent(index, name, int(body["client_id"]), str(body["credential"]), keypair)


async def _bounded(limit: int, coroutines: list[Any]) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def run(coroutine: Any) -> Any:
        async with semaphore:
            return await coroutine

    return list(await asyncio.gather(*(run(c) for c in coroutines)))


def _job_spec(names: list[str]) -> dict[str, Any]:
    return {
        "name": "bench-load",
        "model_ref": MODEL_REF,
        "task_type": "generation",
        "split_plan": {"front_layers": 1, "back_layers": 1},
        "adapter": {"r": 4, "alpha": 8},
        "hyperparameters": {
            "lr": 1e-3,
            "batch_size": ROWS,
            "max_batch_size": 8,
            "max_seq_len": SEQ,
            "batch_window_s": 3600.0,  # the first batch waits for the holdout, which never uploads
        },
        "parallel_mode": "client_batch",
        "rounds": 1,
        "steps_per_round": 1,
        "min_clients": len(names),
        "round_timeout_s": 3600,
        "start": "manual",  # the bench starts it itself, at a known moment
        "clients": names,
    }


def _seal_forward(agent: SimAgent, job_id: int, round_number: int, server_b64: str) -> None:
    import torch

    from flglm.step_messages import seal_activations
    from flglm.step_protocol import STEP_MESSAGE_PATH, MessageDirection, MessageRef
    from flglm.wire.keys import derive_channel_keys, public_key_from_b64

    keys = derive_channel_keys(
        agent.keypair.private_key, public_key_from_b64(server_b64), str(job_id), str(agent.client_id)
    )
    ref = MessageRef(
        job_id=job_id,
        round_number=round_number,
        step=0,
        client_id=agent.client_id,
        direction=MessageDirection.activations,
        sequence=1,
    )
    hidden = _hidden_size()
    generator = torch.Generator().manual_seed(agent.index)
    h0 = torch.randn(ROWS, SEQ, hidden, generator=generator)  # (batch, seq, hidden)
    mask = torch.ones(ROWS, SEQ, dtype=torch.long)  # (batch, seq)
    agent.sealed = seal_activations(keys, ref, h0, mask, torch.float32)
    agent.upload_path = STEP_MESSAGE_PATH.format(
        job_id=job_id, round_number=round_number, step=0, direction=ref.direction.value, sequence=1
    )


def _hidden_size() -> int:
    from flglm.models import load_config

    return int(load_config(MODEL_REF).hidden_size)


# ---- the timed window --------------------------------------------------------------------------------


async def _every(interval_s: float, deadline: float, action: Callable[[], Any]) -> None:
    """`action` at a random phase within the first interval, then every `interval_s`, until `deadline`."""
    due = time.monotonic() + random.uniform(0, interval_s)
    while due < deadline:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        await action()
        due = max(due + interval_s, time.monotonic())


async def _agent(
    agent: SimAgent,
    backend: ServedBackend,
    tls: ssl.SSLContext,
    config: LoadBenchConfig,
    recorder: Recorder,
    deadline: float,
    role: str,
) -> None:
    """One simulated agent until `deadline`: `role` "participant" (work, then its step), "holdout" (in the
    job, never uploads) or "idle" (in no job: work long-polls)."""
    from flglm.protocol import API_PREFIX, HEARTBEAT_PATH, PROTOCOL_HEADER, PROTOCOL_VERSION, WORK_PATH

    headers = {"Authorization": f"Bearer {agent.credential}", PROTOCOL_HEADER: PROTOCOL_VERSION}
    async with httpx.AsyncClient(
        base_url=backend.base_url + API_PREFIX,
        headers=headers,
        verify=tls,
        timeout=30.0,
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
    ) as client:

        async def heartbeat() -> None:
            await recorder.call(HEARTBEAT, client, "POST", HEARTBEAT_PATH, json={})

        async def work() -> None:
            await recorder.call(WORK, client, "GET", WORK_PATH)

        async def wait_for_work() -> None:
            while (remaining := deadline - time.monotonic()) > min(config.work_wait_s, 0.5):
                wait_s = round(min(config.work_wait_s, remaining), 3)
                await recorder.call(
                    IDLE_WORK,
                    client,
                    "GET",
                    WORK_PATH,
                    wait_s=wait_s,
                    params={"wait_s": f"{wait_s:.3f}"},
                    timeout=wait_s + 30.0,
                )
                await asyncio.sleep(config.poll_s)

        async def step() -> None:
            await asyncio.sleep(random.uniform(0, min(1.0, config.seconds / 4)))
            if config.work_wait_s > 0:
                await work()  # the open round, at once; the agent asks again only after it
            uploaded = await recorder.call(
                UPLOAD,
                client,
                "PUT",
                agent.upload_path,
                content=agent.sealed,
                headers={"Content-Type": "application/octet-stream"},
                timeout=60.0,
            )
            if uploaded is None or uploaded.status_code not in (200, 201):
                return
            while (remaining := deadline - time.monotonic()) > min(config.wait_s, 0.5):
                wait_s = round(min(config.wait_s, remaining), 3)
                await recorder.call(
                    RESULT,
                    client,
                    "GET",
                    agent.upload_path + "/result",
                    wait_s=wait_s,
                    params={"wait_s": f"{wait_s:.3f}"},
                    timeout=wait_s + 30.0,
                )

        tasks = [_every(config.heartbeat_s, deadline, heartbeat)]
        if config.work_wait_s == 0:
            tasks.append(_every(config.poll_s, deadline, work))
        elif role == "idle":
            tasks.append(wait_for_work())
        if role == "participant":
            tasks.append(step())
        await asyncio.gather(*tasks)


async def _operator(
    admin: httpx.AsyncClient, job_id: int, config: LoadBenchConfig, recorder: Recorder, deadline: float
) -> None:
    async def page() -> None:
        await asyncio.gather(
            recorder.call(JOB, admin, "GET", f"/jobs/{job_id}"),
            recorder.call(ROUNDS, admin, "GET", f"/jobs/{job_id}/rounds"),
            recorder.call(PROGRESS, admin, "GET", f"/metrics/jobs/{job_id}/progress"),
        )

    await _every(config.operator_s, deadline, page)


async def _progress(recorder: Recorder, started: float, deadline: float, log: Callable[[str], None]) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        requests, errors = recorder.totals()
        log(f"load: {time.monotonic() - started:5.1f} s, {requests} requests, {errors} errors")


async def _run(config: LoadBenchConfig, backend: ServedBackend, log: Callable[[str], None]) -> dict[str, Any]:
    from flglm.protocol import AGENT_JOB_PATH, API_PREFIX, INVITATION_DECISION_PATH

    tls = ssl.create_default_context(cafile=str(backend.ca_cert))
    async with (
        httpx.AsyncClient(
            base_url=backend.base_url + API_PREFIX,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            verify=tls,
            timeout=60.0,
        ) as admin,
        httpx.AsyncClient(base_url=backend.base_url + API_PREFIX, verify=tls, timeout=60.0) as anon,
    ):
        setup_start = time.monotonic()
        names = [f"load-agent-{i}" for i in range(config.agents)] + ["load-holdout"]
        idle_names = [f"load-idle-{i}" for i in range(config.idle_agents)]
        agents: list[SimAgent] = await _bounded(
            16, [_enroll(admin, anon, i, name) for i, name in enumerate(names)]
        )
        idle: list[SimAgent] = await _bounded(
            16, [_enroll(admin, anon, len(names) + i, name) for i, name in enumerate(idle_names)]
        )
        job_id = int((await _ok(admin, "POST", "/jobs", 201, json=_job_spec(names)))["id"])
        await _ok(admin, "POST", f"/jobs/{job_id}/open", 200)
        await _bounded(
            16,
            [
                _ok(
                    admin,
                    "POST",
                    INVITATION_DECISION_PATH.format(job_id=job_id),
                    200,
                    json={"decision": "approve"},
                    headers={"Authorization": f"Bearer {a.credential}"},
                )
                for a in agents
            ],
        )
        await _ok(admin, "POST", f"/jobs/{job_id}/start", 200)
        view = await _ok(
            admin,
            "GET",
            AGENT_JOB_PATH.format(job_id=job_id),
            200,
            headers={"Authorization": f"Bearer {agents[0].credential}"},
        )
        for agent in agents[: config.agents]:
            _seal_forward(agent, job_id, int(view["current_round"]), str(view["server_public_key"]))
        setup_s = time.monotonic() - setup_start
        log(f"load: {len(agents)} agents enrolled and approved job {job_id} in {setup_s:.1f} s; timing")

        recorder = Recorder()
        started = time.monotonic()
        deadline = started + config.seconds
        await asyncio.gather(
            *(
                _agent(
                    a,
                    backend,
                    tls,
                    config,
                    recorder,
                    deadline,
                    "participant" if a.index < config.agents else "holdout",
                )
                for a in agents
            ),
            *(_agent(a, backend, tls, config, recorder, deadline, "idle") for a in idle),
            _operator(admin, job_id, config, recorder, deadline),
            _progress(recorder, started, deadline, log),
        )
        elapsed = time.monotonic() - started
    return {"job_id": job_id, "setup_s": setup_s, "elapsed_s": elapsed, "recorder": recorder}


def _route_figures(name: str, stats: RouteStats, elapsed_s: float) -> dict[str, Any]:
    kind, expected = ROUTES[name]
    p99 = percentile(stats.latencies_ms, 99)
    target = TARGETS["p99_ms_non_waiting"] if kind == "plain" else None
    return {
        "kind": kind,
        "expected_status": expected,
        "requests": len(stats.latencies_ms),
        "requests_per_s": len(stats.latencies_ms) / elapsed_s,
        "errors": stats.errors,
        "statuses": dict(stats.statuses),
        "p50_ms": percentile(stats.latencies_ms, 50),
        "p99_ms": p99,
        "max_ms": max(stats.latencies_ms, default=None),
        # Long-polls: how long after the requested wait_s the 204 came (queueing for the wait threads).
        "overshoot_p50_ms": percentile(stats.overshoot_ms, 50),
        "overshoot_p99_ms": percentile(stats.overshoot_ms, 99),
        "target_p99_ms": target,
        "meets_target": None if target is None or p99 is None else p99 < target,
        "error_samples": stats.error_samples,
    }


def run_load_bench(
    config: LoadBenchConfig, work_dir: Path | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Every figure of `flglm bench load` as one JSON-able dict (backend log under `work_dir` if given)."""
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    with (
        bench_workspace(config.database_url, "load", work_dir) as space,
        running_backend(space.root, space.database_url) as backend,
    ):
        say(f"load: backend up at {backend.base_url} (pid {backend.serve_pid}, schema {space.schema})")
        outcome = asyncio.run(_run(config, backend, say))
        peak_rss = peak_resident_bytes(backend.serve_pid)
    recorder: Recorder = outcome["recorder"]
    elapsed = float(outcome["elapsed_s"])
    routes = {name: _route_figures(name, stats, elapsed) for name, stats in recorder.routes.items()}
    requests, errors = recorder.totals()
    plain_p99 = [r["p99_ms"] for r in routes.values() if r["kind"] == "plain" and r["p99_ms"] is not None]
    worst_p99 = max(plain_p99, default=None)
    return {
        "bench": "load",
        "config": asdict(config) | {"database_url": "<server url>; fresh schema, dropped"},
        "agents": config.agents,
        "holdout_agents": 1,
        "idle_agents": config.idle_agents,
        "seconds": elapsed,
        "setup_s": outcome["setup_s"],
        "job_id": outcome["job_id"],
        "requests": requests,
        "errors": errors,
        "long_polls": routes[RESULT]["requests"] + routes[IDLE_WORK]["requests"],
        "backend_peak_rss_bytes": peak_rss,
        "worst_non_waiting_p99_ms": worst_p99,
        "routes": routes,
        "targets": TARGETS,
        "meets_targets": {
            "agents": config.agents >= TARGETS["agents"],
            "p99_ms_non_waiting": None if worst_p99 is None else worst_p99 < TARGETS["p99_ms_non_waiting"],
            "errors": errors == TARGETS["errors"],
        },
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }


def load_table(result: dict[str, Any]) -> str:
    """A readable table of `run_load_bench`'s result, targets beside the figures."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        f"{result['agents']} agents (+{result['holdout_agents']} holdout, {result['idle_agents']} idle) for "
        f"{result['seconds']:.1f} s "
        f"(target {TARGETS['agents']}): {result['requests']} requests, {result['errors']} errors "
        f"(target {TARGETS['errors']}), {result['long_polls']} long-polls",
        f"{'route':<70} {'kind':<9} {'n':>6} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} target",
    ]
    for name, route in result["routes"].items():
        target = "-" if route["target_p99_ms"] is None else f"p99 < {route['target_p99_ms']:.0f} ms"
        if route["meets_target"] is not None:
            target += " ok" if route["meets_target"] else " MISSED"
        lines.append(
            f"{name:<70} {route['kind']:<9} {route['requests']:>6} {route['errors']:>4} "
            f"{ms(route['p50_ms']):>8} {ms(route['p99_ms']):>8} {target}"
        )
    for name in (RESULT, IDLE_WORK):
        long_poll = result["routes"][name]
        lines.append(
            f"{name}: answered after its wait_s by p50 {ms(long_poll['overshoot_p50_ms'])} ms, "
            f"p99 {ms(long_poll['overshoot_p99_ms'])} ms"
        )
    rss = result["backend_peak_rss_bytes"]
    lines.append(f"backend peak RSS (VmHWM): {'-' if rss is None else f'{rss / 2**20:.0f} MiB'}")
    for name, route in result["routes"].items():
        for sample in route["error_samples"]:
            lines.append(f"error {name}: {sample}")
    return "\n".join(lines)
