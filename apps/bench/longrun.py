"""`flglm bench longrun`: a long tiny-model job through the full stack, and what it leaves behind.

One `flglm serve --self-signed` subprocess on PostgreSQL (a fresh schema, dropped afterwards) with the
Celery executor (Redis database 6, flushed before and after) and one `flglm worker --replica 0`
subprocess (`apps.bench.load.running_backend`). Real agents (`flglm agent enroll`, `approve`, then
`flglm agent run --stop-when-done --quiet` subprocesses, each with its own state directory and data file)
train one `client_batch` classification job on `tiny:llama:0` for `steps` steps per client (`rounds`
rounds of `steps / rounds` steps). Once it has completed and the agents have exited, the bench measures:
the job's status, wall time and steps/s; exactly-once (the worker's replica counters: `server_steps` and
the `applied` step keys must be every client's every step, once); every Redis key left in the database,
grouped by kind with its TTLs and judged against the retention the code promises for that kind (a key
with no TTL that is not documented as permanent, or a TTL beyond the promise, is a leak); the rows of
every table of the schema against the rows the job should have produced; files under the backend's data
directory; and the peak RSS (VmHWM) of the backend and the worker.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from apps.bench.load import ADMIN_TOKEN, bench_workspace, running_backend
from apps.bench.stack import ServedBackend
from flglm.process_memory import peak_resident_bytes

REDIS_URL = "redis://127.0.0.1:6379/6"  # a database of its own (load: 11, stack: 13, tests: 7-15)
MODEL_REF = "tiny:llama:0"
LABELS = ["marmalade", "tangerine"]
WORDS = ["quokka", "zeppelin", "harbour", "obsidian", "lantern", "walrus", "fjord", "cobalt"]
FLGLM_CLI = [sys.executable, "-m", "apps.cli.main"]
# How long the agents may take to exit once their job ended: each evaluates the last round first.
AGENT_EXIT_WAIT_S = 600.0
HOUR, DAY = 3600.0, 86400.0


@dataclass(frozen=True)
class LongRunConfig:
    """What the long run trains: `steps` steps per client over `rounds` rounds, `agents` real agents."""

    steps: int = 1000
    rounds: int = 10
    agents: int = 2
    batch_size: int = 2
    timeout_s: float = 3600.0
    database_url: str = ""  # empty: FLGLM_DATABASE_URL, else the local test database (bench_workspace)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.rounds < 1 or self.agents < 1 or self.batch_size < 1:
            raise ValueError("steps, rounds, agents and batch size must be >= 1")
        if self.steps % self.rounds:
            raise ValueError(f"steps ({self.steps}) must be a multiple of rounds ({self.rounds})")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")

    @property
    def steps_per_round(self) -> int:
        """Steps of each round."""
        return self.steps // self.rounds


# ---- retention: what each Redis key kind is, who writes it, and how long it may live --------------------


@dataclass(frozen=True)
class Retention:
    """One kind of Redis key: its group pattern, writer (file:line) and promised TTL (None: permanent)."""

    pattern: str
    kind: str
    writer: str
    promised_ttl_s: float | None


def _job_blob_ttl_s() -> float:
    """The default `blob_ttl_s` of a job (the bench's job keeps the default)."""
    from flglm.contracts.job_settings import Hyperparameters

    return float(Hyperparameters.model_fields["blob_ttl_s"].default)


def retention_rules() -> list[Retention]:
    """Every Redis key kind the product writes, with the TTL its code sets (read from the code)."""
    from backend.steps.service import STAGING_TTL_S
    from flglm.contracts.dispatch import DONE_TOKEN_TTL_S
    from flglm.contracts.job_spec import MIN_SPEC_TTL_S

    blob = _job_blob_ttl_s()
    blob_ready = r"(#ready)?$"
    return [
        Retention(r"^flglm:blob:job:\{n\}:spec" + blob_ready, "job spec blob (+ waiters' token list)",
                  "flglm/contracts/job_spec.py:18", max(blob, MIN_SPEC_TTL_S)),
        Retention(r"^flglm:blob:staging:msg:", "upload awaiting admission (deleted after it)",
                  "backend/steps/service.py:287 (deleted :307)", STAGING_TTL_S),
        Retention(r"^flglm:blob:msg:", "sealed step message (a step's expire 60 s after the checkpoint that "
                  "covers it: worker/replica.py CONSUMED_GRACE_S; adapters and eval after blob_ttl_s)",
                  "backend/steps/service.py:308, worker/replica_mailbox.py:96, worker/fedavg.py:82", blob),
        Retention(r"^flglm:blob:journal:", "replica journal (checkpointed server steps)",
                  "worker/replica_journal.py:66", blob),
        Retention(r"^flglm:blob:examples:", "client example count (FedAvg weight)",
                  "backend/steps/service.py:349", blob),
        Retention(r"^flglm:blob:server-state:", "replica sync state", "worker/replica_sync.py:44", blob),
        Retention(r"^flglm:blob:gen:", "generation session input/output",
                  "backend/exports/sessions.py:117, worker/generation.py:266", 600.0),
        Retention(r"^flglm:seq:", "replay guard (last accepted sequence)", "worker/admission.py:124",
                  90 * DAY),
        Retention(r"^flglm:deliveries:", "task delivery count", "worker/tasks.py:78", DAY),
        Retention(r"^flglm:task-done:", "task-finished token (BLPOP)", "worker/tasks.py:_announce_done",
                  DONE_TOKEN_TTL_S),
        Retention(r"^flglm:worker-slot:", "replica slot lease", "worker/slots.py:123", 30.0),
        Retention(r"^celery-task-meta-", "Celery task result", "worker/celery_app.py:64 (result_expires)",
                  6 * HOUR),
        Retention(r"^_kombu\.binding", "Celery queue bindings and their sweep index (kombu bookkeeping)",
                  "kombu/transport/redis.py (_queue_bind)", None),
        Retention(r"^unacked(_index|_mutex)?$", "Celery unacknowledged-task bookkeeping", "kombu", None),
        Retention(r"^flglm\.[a-z]+(\.\{n\})?$", "Celery queue (a list only while it holds tasks)",
                  "flglm/contracts/tasks.py, flglm/step_protocol.py:204", None),
    ]  # fmt: skip


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX = re.compile(r"(?<![0-9a-z])[0-9a-f]{32}(?![0-9a-z])")
_NUMBER = re.compile(r"(?<=[:.\-])\d+(?=$|[:#.\-])")


def key_group(key: str) -> str:
    """`key` with its ids replaced: uuids by {uuid}, 32-hex ids by {hex}, numbers by {n}."""
    return _NUMBER.sub("{n}", _HEX.sub("{hex}", _UUID.sub("{uuid}", key)))


def redis_key_groups(client: Any) -> dict[str, dict[str, Any]]:
    """Every key of the database grouped by `key_group`, each group with its count and TTLs (-1: none)."""
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in client.scan_iter(count=1000)]
    ttls: list[int] = []
    for start in range(0, len(keys), 500):
        with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 500]:
                pipe.ttl(key)
            ttls += [int(t) for t in pipe.execute()]
    groups: dict[str, dict[str, Any]] = {}
    for key, ttl in zip(keys, ttls, strict=True):
        if ttl == -2:  # expired between SCAN and TTL
            continue
        group = groups.setdefault(key_group(key), {"count": 0, "no_ttl": 0, "ttls": [], "example": key})
        group["count"] += 1
        if ttl == -1:
            group["no_ttl"] += 1
        else:
            group["ttls"].append(ttl)
    for group in groups.values():
        ttls_of = group.pop("ttls")
        group["ttl_min_s"] = -1 if group["no_ttl"] else min(ttls_of)
        group["ttl_max_s"] = -1 if group["no_ttl"] == group["count"] else max(ttls_of)
    return dict(sorted(groups.items()))


def classify_groups(groups: dict[str, dict[str, Any]], rules: list[Retention]) -> list[str]:
    """Adds kind, writer, promise and verdict to every group; returns the groups that leak."""
    leaks = []
    for name, group in groups.items():
        rule = next((r for r in rules if re.search(r.pattern, name)), None)
        group["kind"] = rule.kind if rule else "unknown"
        group["writer"] = rule.writer if rule else None
        group["promised_ttl_s"] = rule.promised_ttl_s if rule else None
        if rule is not None and rule.promised_ttl_s is None:
            group["verdict"] = "permanent (documented)"
        elif group["no_ttl"]:
            group["verdict"] = f"LEAK: {group['no_ttl']} key(s) without TTL"
        elif rule is None:
            group["verdict"] = "unclassified (expires)"
        elif rule.promised_ttl_s is not None and group["ttl_max_s"] > math.ceil(rule.promised_ttl_s) + 1:
            group["verdict"] = f"LEAK: TTL {group['ttl_max_s']} s > promised {rule.promised_ttl_s:.0f} s"
        else:
            group["verdict"] = "expires as promised"
        if group["verdict"].startswith("LEAK"):
            leaks.append(name)
    return leaks


# ---- rows, files, processes ------------------------------------------------------------------------------


def table_counts(database_url: str) -> dict[str, int]:
    """Rows of every table in the schema of `database_url` (its search_path)."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tables = sorted(sa.inspect(conn).get_table_names())
            return {t: int(conn.execute(sa.text(f'SELECT count(*) FROM "{t}"')).scalar_one()) for t in tables}
    finally:
        engine.dispose()


def audit_actions(database_url: str) -> dict[str, int]:
    """How many audit events of each action the schema holds."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT action, count(*) FROM audit_events GROUP BY action"))
            return {str(action): int(count) for action, count in rows}
    finally:
        engine.dispose()


def expected_rows(config: LongRunConfig) -> dict[str, int]:
    """Rows one job of `config` should leave per table (tables absent here have no expectation)."""
    n = config.agents
    return {
        "clients": n,
        "enrollment_tokens": n,
        "jobs": 1,
        "job_participants": n,
        "rounds": config.rounds,
        "round_participants": config.rounds * n,
        "step_metrics": config.steps * n,
        "privacy_audits": 0,
    }


def directory_usage(root: Path) -> dict[str, dict[str, int]]:
    """Files and bytes under each top-level entry of `root`."""
    usage: dict[str, dict[str, int]] = {}
    if not root.is_dir():
        return usage
    for entry in sorted(root.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        usage[entry.name] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return usage


def child_pids(argument: str) -> list[int]:
    """Pids of this process's children whose command line has `argument` among its words."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            words = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and argument.encode() in words:
            found.append(int(stat.parent.name))
    return sorted(found)


def replica_counters(redis_url: str, job_id: int) -> dict[str, Any]:
    """The worker's step counters of replica 0 of the job (`server_steps`, the `applied` step keys)."""
    from flglm.contracts.dispatch import CeleryDispatcher
    from flglm.contracts.tasks import REPLICA_COUNTERS
    from flglm.step_protocol import replica_queue

    dispatcher = CeleryDispatcher(redis_url)
    try:
        kwargs = {"job_id": job_id, "replica": 0, "load": True}
        return dict(dispatcher.submit(REPLICA_COUNTERS, kwargs, replica_queue(0)).get(60))
    finally:
        dispatcher.close()


# ---- real agents -------------------------------------------------------------------------------------------


def owner_rows(owner: int) -> list[dict[str, str]]:
    """Eight classification rows of made-up words for data owner `owner`."""
    return [
        {
            "text": f"{WORDS[i % 8]} {WORDS[(i + owner) % 8]} secret{owner}x{i}",
            "label": LABELS[(i + owner) % 2],
        }
        for i in range(8)
    ]


@dataclass
class Agent:
    """One `flglm agent`: its name, state directory, data file and log."""

    name: str
    state_dir: Path
    data: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()  # more `flglm agent run` options

    def env(self) -> dict[str, str]:
        """The agent's environment: its state directory, offline hub, one thread."""
        return {
            **os.environ,
            "FLGLM_AGENT_STATE": str(self.state_dir),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }

    def cli(self, *args: str) -> None:
        """`flglm agent ARGS`; raises with its stderr when it fails."""
        done = subprocess.run(
            [*FLGLM_CLI, "agent", *args], env=self.env(), capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"flglm agent {args[0]} ({self.name}) exited {done.returncode}: {done.stderr}")

    def start(self) -> None:
        """`flglm agent run --stop-when-done --quiet` in the background, logging to `log`."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*FLGLM_CLI, "agent", "run", "--data", str(self.data), "--quiet", "--poll-s", "0.3",
                 "--stop-when-done", *self.extra_args],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def check(self) -> None:
        """Raises when the agent's run exited with a failure."""
        if self.process is not None and self.process.poll() not in (None, 0):
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"agent {self.name} exited {self.process.returncode}:\n{tail}")


@contextmanager
def agents_stopped(agents: list[Agent]) -> Iterator[list[Agent]]:
    """Yields `agents`; afterwards any still running is terminated (killed after 15 s)."""
    try:
        yield agents
    finally:
        for agent in agents:
            if agent.process is not None and agent.process.poll() is None:
                agent.process.terminate()
                try:
                    agent.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    agent.process.kill()
                    agent.process.wait()


class Admin:
    """The operator's HTTPS client of the backend's API."""

    def __init__(self, backend: ServedBackend) -> None:
        self.http = httpx.Client(
            base_url=backend.base_url + "/api/v1",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            verify=str(backend.ca_cert),
            timeout=60,
        )

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        """The JSON answer of a request that must answer `status`."""
        response = self.http.request(method, path, **kwargs)
        if response.status_code != status:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json() if response.content else None


def job_spec(config: LongRunConfig, names: list[str]) -> dict[str, Any]:
    """The long run's job: `client_batch` classification on the tiny Llama."""
    return {
        "name": "bench-longrun",
        "model_ref": MODEL_REF,
        "task_type": "classification",
        "split_plan": {"front_layers": 1, "back_layers": 1},
        "adapter": {"r": 4, "alpha": 8},
        "hyperparameters": {
            "lr": 5e-3,
            "batch_size": config.batch_size,
            "labels": LABELS,
            "max_batch_size": 16,
            "max_seq_len": 64,
        },
        "parallel_mode": "client_batch",
        "rounds": config.rounds,
        "steps_per_round": config.steps_per_round,
        "min_clients": len(names),
        "round_timeout_s": config.timeout_s,
        "start": "manual",  # the run starts it itself once its agents are online
        "clients": names,
    }


def _run_job(
    config: LongRunConfig, backend: ServedBackend, work_dir: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """Enroll the agents, run the job to its end; returns its id, status, wall time and rounds."""
    agents = [
        Agent(
            f"longrun-{i}",
            work_dir / f"state-{i}",
            work_dir / f"owner-{i}.jsonl",
            work_dir / f"agent-{i}.log",
        )
        for i in range(config.agents)
    ]
    for i, agent in enumerate(agents):
        agent.data.write_text("".join(json.dumps(row) + "\n" for row in owner_rows(i)))
    spec = job_spec(config, [a.name for a in agents])
    return run_agents_job(backend, agents, spec, config.steps * config.agents, config.timeout_s, say)


def run_agents_job(
    backend: ServedBackend,
    agents: list[Agent],
    spec: dict[str, Any],
    client_steps: int,
    timeout_s: float,
    say: Callable[[str], None],
    on_tick: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Enroll `agents` (their data files written), submit `spec`, run it to its end with the agents as
    `flglm agent run` processes; `on_tick(steps_reported)` about every second. Returns the job's id, status,
    wall time, rounds and the agents' exit codes."""
    admin = Admin(backend)
    try:
        with agents_stopped(agents):
            for agent in agents:
                body = {"name": agent.name}
                token = admin.ok("POST", "/clients/enrollment-tokens", 201, json=body)["token"]
                agent.cli("enroll", "--server", backend.base_url, "--token", token,
                          "--ca-cert", str(backend.ca_cert), "--name", agent.name)  # fmt: skip
            job_id = int(admin.ok("POST", "/jobs", 201, json=spec)["id"])
            admin.ok("POST", f"/jobs/{job_id}/open")
            for agent in agents:
                agent.cli("approve", str(job_id))
                agent.start()
            deadline = time.monotonic() + 300
            while admin.http.post(f"/jobs/{job_id}/start").status_code != 200:
                for agent in agents:
                    agent.check()
                if time.monotonic() > deadline:
                    raise RuntimeError("the job never started: the agents did not come online in 300 s")
                time.sleep(0.5)
            started = time.monotonic()
            say(f"{spec['name']}: job {job_id} started: {len(agents)} agents, {spec['rounds']} rounds x "
                f"{spec['steps_per_round']} steps")  # fmt: skip
            status, shown = "", (0, -1)
            while True:
                job = admin.ok("GET", f"/jobs/{job_id}")
                status = str(job["status"])
                if status in ("completed", "failed", "cancelled"):
                    break
                progress = admin.ok("GET", f"/metrics/jobs/{job_id}/progress")
                reported = int(progress["steps_reported"])
                if on_tick is not None:
                    on_tick(reported)
                now = (int(job["current_round"] or 0), reported // max(1, client_steps // 20))
                if now != shown:
                    shown = now
                    elapsed = time.monotonic() - started
                    rate = reported / max(elapsed, 1e-9)
                    say(f"{spec['name']}: round {now[0]}/{spec['rounds']}, {reported}/{client_steps} client "
                        f"steps, {elapsed:.0f} s, {rate:.1f} client steps/s")  # fmt: skip
                for agent in agents:
                    agent.check()
                if time.monotonic() - started > timeout_s:
                    raise RuntimeError(f"job {job_id} did not finish within {timeout_s:.0f} s")
                time.sleep(1.0)
            wall_s = time.monotonic() - started
            say(f"{spec['name']}: job {job_id} {status} after {wall_s:.1f} s; waiting for the agents to exit")
            exits: list[int | None] = []
            for agent in agents:
                assert agent.process is not None
                try:
                    exits.append(agent.process.wait(timeout=AGENT_EXIT_WAIT_S))
                except subprocess.TimeoutExpired:
                    exits.append(None)
            rounds = admin.ok("GET", f"/jobs/{job_id}/rounds")
        return {"job_id": job_id, "status": status, "wall_s": wall_s, "rounds": rounds, "agent_exits": exits}
    finally:
        admin.http.close()


def _exactly_once(
    counters: dict[str, Any], rounds: list[dict[str, Any]], journal_entries: int, config: LongRunConfig
) -> dict[str, Any]:
    """The replica counters against every participant's every step of every round.

    `applied` must hold each client step ("round:step:client") exactly once. In `client_batch` one
    optimizer step (`server_steps`, one journal entry each) applies a whole batch of client steps, so
    `server_steps` is `steps` when every batch was full and at most `agents * steps` otherwise. Journal
    entries a checkpoint covers expire (worker/replica.py `_expire_consumed`), so at most `server_steps`
    remain (`journal_entries`, counted when the job ended)."""
    applied = [str(a) for a in counters.get("applied", [])]
    expected = {
        f"{r['number']}:{step}:{p['client_id']}"
        for r in rounds
        for p in r["participants"]
        for step in range(config.steps_per_round)
    }
    server_steps = int(counters.get("server_steps", -1))
    want = config.steps * config.agents
    return {
        "server_steps": server_steps,
        "server_steps_range": [config.steps, want],
        "full_batches": server_steps == config.steps,
        "journal_entries": journal_entries,
        "applied": len(applied),
        "applied_unique": len(set(applied)),
        "expected": want,
        "missing": sorted(expected - set(applied))[:10],
        "unexpected": sorted(set(applied) - expected)[:10],
        "ok": len(applied) == len(set(applied)) == want
        and set(applied) == expected
        and config.steps <= server_steps <= want
        and journal_entries <= server_steps,
    }


def run_longrun_bench(
    config: LongRunConfig, work_dir: Path | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Every figure of `flglm bench longrun` as one JSON-able dict (logs under `work_dir` if given)."""
    import redis

    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    with bench_workspace(config.database_url, "longrun", work_dir) as space:
        root, database_url = space.root, space.database_url
        with running_backend(root, database_url, REDIS_URL, "longrun") as backend:
            workers = child_pids("worker")
            say(f"longrun: backend up at {backend.base_url} (pid {backend.serve_pid}, worker {workers}, "
                f"schema {space.schema})")  # fmt: skip
            outcome = _run_job(config, backend, root, say)
            time.sleep(2.0)  # let the last round's tasks settle before the accounting
            client = redis.Redis.from_url(REDIS_URL)
            try:
                groups = redis_key_groups(client)  # before the counters task adds its own result key
                used_memory = int(client.info("memory")["used_memory"])
            finally:
                client.close()
            counts = table_counts(database_url)
            actions = audit_actions(database_url)
            files = directory_usage(root / "backend")
            counters = replica_counters(REDIS_URL, int(outcome["job_id"]))
            rss = {
                "backend": peak_resident_bytes(backend.serve_pid),
                "worker": peak_resident_bytes(workers[0]) if workers else None,
            }
    leaks = classify_groups(groups, retention_rules())
    expected = expected_rows(config)
    rows = {t: {"count": n, "expected": expected.get(t)} for t, n in counts.items()}
    mismatched = [t for t, r in rows.items() if r["expected"] is not None and r["count"] != r["expected"]]
    mismatched += [t for t in expected if t not in rows]
    journal = groups.get("flglm:blob:journal:{n}:{n}:{n}", {}).get("count", 0)
    once = _exactly_once(counters, outcome["rounds"], int(journal), config)
    completed = outcome["status"] == "completed"
    audit_ok = actions.get("job.start") == 1 and actions.get("job.complete") == 1
    wall = float(outcome["wall_s"])
    return {
        "bench": "longrun",
        "config": asdict(config) | {"database_url": "<server url>; fresh schema, dropped"},
        "job_id": outcome["job_id"],
        "completed": {
            "status": outcome["status"],
            "wall_s": wall,
            "steps": config.steps,
            "client_steps": config.steps * config.agents,
            "steps_per_s": config.steps / wall,
            "client_steps_per_s": config.steps * config.agents / wall,
            "agent_exit_codes": outcome["agent_exits"],
        },
        "exactly_once": once,
        "redis": {
            "db": REDIS_URL.rsplit("/", 1)[1],
            "keys": sum(g["count"] for g in groups.values()),
            "used_memory_bytes": used_memory,
            "groups": groups,
        },
        "leaks": leaks,
        "rows": rows,
        "row_mismatches": mismatched,
        "audit_actions": actions,
        "data_dir": files,
        "peak_rss_bytes": rss,
        "ok": completed and once["ok"] and not leaks and not mismatched and audit_ok,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }


def longrun_table(result: dict[str, Any]) -> str:
    """A readable report of `run_longrun_bench`'s result."""
    done, once = result["completed"], result["exactly_once"]

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**20:.0f} MiB"

    def ttl(value: int) -> str:
        return "none" if value == -1 else f"{value} s"

    lines = [
        f"job {result['job_id']}: {done['status']} in {done['wall_s']:.1f} s, {done['steps']} steps "
        f"({done['steps_per_s']:.2f} steps/s, {done['client_steps_per_s']:.2f} client steps/s)",
        f"exactly once: applied {once['applied']} client steps ({once['applied_unique']} unique), "
        f"expected {once['expected']}; server_steps {once['server_steps']} (optimizer steps, "
        f"{once['server_steps_range'][0]}..{once['server_steps_range'][1]}; journal entries "
        f"{once['journal_entries']}): {'ok' if once['ok'] else 'FAILED'}",
        f"redis db {result['redis']['db']}: {result['redis']['keys']} keys, "
        f"used_memory {mib(result['redis']['used_memory_bytes'])}",
        f"  {'group':<58} {'n':>6} {'ttl min':>10} {'ttl max':>10}  verdict",
    ]
    for name, group in result["redis"]["groups"].items():
        lines.append(
            f"  {name:<58} {group['count']:>6} {ttl(group['ttl_min_s']):>10} {ttl(group['ttl_max_s']):>10}"
            f"  {group['verdict']}"
        )
    lines.append(f"leaks: {', '.join(result['leaks']) or 'none'}")
    lines.append(f"  {'table':<30} {'rows':>8} {'expected':>9}")
    for table, row in result["rows"].items():
        expected = "-" if row["expected"] is None else str(row["expected"])
        lines.append(f"  {table:<30} {row['count']:>8} {expected:>9}")
    lines.append(f"row mismatches: {', '.join(result['row_mismatches']) or 'none'}")
    rss = result["peak_rss_bytes"]
    lines.append(f"peak RSS (VmHWM): backend {mib(rss['backend'])}, worker {mib(rss['worker'])}")
    lines.append(f"overall: {'ok' if result['ok'] else 'FAILED'}")
    return "\n".join(lines)
