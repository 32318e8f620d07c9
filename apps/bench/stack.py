"""`flglm bench`: full-stack throughput, centralized trainer vs the platform's parallel modes, in one run.

Same model, same tokens, same machine. Each client `c` consumes, at step `s`, the batch
`stack_bench_batch(c, s)` (b rows of real text, seq tokens, no padding); step 0 is an untimed warm-up
everywhere. Right before each full-stack mode with N clients, the centralized trainer (`CentralizedTrainer`,
kept loaded in this process, the same LoRA adapters on the whole model) runs exactly that mode's batches
(clients 0..N-1, steps 1..S, one optimizer step per client batch of b rows), so both see the same tokens
under (nearly) the same machine load. Tokens/s = real (non-pad) tokens / wall seconds; for a mode that is
all its clients' timed tokens over the window from the first timed step's start to the last one's end
(aggregate throughput), so the ratio to centralized is also the ratio of wall times for the same tokens.

Full stack: a `flglm serve --self-signed` subprocess (SQLite; executor in-process by default, or Celery
on Redis with one `flglm worker` subprocess per replica), one enrolled client per data owner, a job per
mode (created, opened, approved, started through the REST API like an operator and agents would), and one
`python -m apps.bench.stack_client` process per client running the agent's step (`run_client_step`:
AES-GCM sealed tensors over HTTPS, long-polls). Those client processes are the agent's step loop without
its data loading, checkpoints and heartbeats (per-step overhead the agent adds is a state-file write); the
backend's heartbeat lease is therefore lifted for the bench.

Wire bytes are the sealed payloads the clients' `StepClient` counted (h0 + mask up, h1 down, dL/dh1 up,
dL/dh0 down; HTTP/TLS framing excluded); raw bytes are the four (batch, seq, hidden) tensors at the
wire dtype (float32), so their ratio is the envelope + header + mask overhead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MODES: dict[str, tuple[str, int, int]] = {  # name: (parallel_mode, clients, replicas)
    "sequential": ("sequential", 1, 1),
    "client_batch_2": ("client_batch", 2, 1),
    "client_batch_4": ("client_batch", 4, 1),
    "server_hierarchical_2": ("server_hierarchical", 2, 2),
}
TARGETS = {"sequential": 0.90, "client_batch": 0.95}
# FL-GLM paper (LLaMA2-7B): time relative to centralized; as throughput ratios 1/1.8 and 1/1.28.
PUBLISHED = {"sequential_time_ratio": 1.8, "client_batch_8_clients_time_ratio": 1.28}
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
ADAPTER: dict[str, Any] = {"r": 8, "alpha": 16}
TRAIN: dict[str, Any] = {"lr": 1e-4}
SPLIT_PLAN = {"front_layers": 1, "back_layers": 1}
REDIS_URL = "redis://127.0.0.1:6379/13"  # a database of its own: never share replica queues with others


@dataclass(frozen=True)
class StackBenchConfig:
    model: str = "smollm2-135m"
    steps: int = 4
    batch_size: int = 4
    seq_len: int = 64
    threads: int = 1
    modes: tuple[str, ...] = tuple(MODES)
    executor: str = "inprocess"
    centralized_device: str = "cpu"  # "cuda": the like-for-like reference where the server body has a GPU

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
        if self.executor not in ("inprocess", "celery"):
            raise ValueError(f"executor must be 'inprocess' or 'celery', not {self.executor!r}")
        if self.centralized_device != "cpu":
            if not self.centralized_device.startswith("cuda"):
                raise ValueError(
                    f"centralized device must be cpu or cuda[:N], not {self.centralized_device!r}"
                )
            import torch

            if not torch.cuda.is_available():
                raise ValueError(
                    f"centralized device {self.centralized_device}: this machine has no CUDA GPU"
                )
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.threads < 1:
            raise ValueError("steps, batch size and threads must be >= 1, seq len >= 2")

    @property
    def max_clients(self) -> int:
        return max(MODES[m][1] for m in self.modes)


def bench_env(threads: int, data_dir: Path, executor: str) -> dict[str, str]:
    """Environment of every subprocess: offline hub, fixed thread count, the backend's settings."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "FLGLM_DATA_DIR": str(data_dir),
        "FLGLM_EXECUTOR": executor,
        "FLGLM_REDIS_URL": REDIS_URL,
        "FLGLM_BOOTSTRAP_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLGLM_RATE_LIMIT_BURST": "100000",
        "FLGLM_RATE_LIMIT_PER_MINUTE": "1000000",
        # The bench's clients run the step loop only, without the agent's heartbeats: no lease expiry.
        "FLGLM_HEARTBEAT_LEASE_S": "86400",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class BenchBackend:
    base_url: str
    ca_cert: Path
    admin: httpx.Client

    def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token or ADMIN_TOKEN}"}
        response = self.admin.request(method, "/api/v1" + path, headers=headers, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json() if response.content else None


@dataclass
class ServedBackend:
    base_url: str
    ca_cert: Path
    serve_pid: int


@contextmanager
def serve_subprocesses(
    work_dir: Path, data_dir: Path, env: dict[str, str], worker_args: Sequence[Sequence[str]] = ()
) -> Iterator[ServedBackend]:
    """`flglm serve --self-signed` on a free port and one `flglm worker ARGS` per entry of `worker_args`, as
    subprocesses logging to <work_dir>/backend.log; yields once /api/v1/health answers; stops them after."""
    from backend.tls import ensure_self_signed

    tls = ensure_self_signed(data_dir / "tls")
    port = free_port()
    cli = [sys.executable, "-m", "apps.cli.main"]
    log_path = work_dir / "backend.log"
    log = log_path.open("ab")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        serve = [*cli, "serve", "--self-signed", "--data-dir", str(data_dir), "--port", str(port)]
        processes.append(subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT))
        for args in worker_args:
            worker = [*cli, "worker", *args]
            processes.append(subprocess.Popen(worker, env=env, stdout=log, stderr=subprocess.STDOUT))
        base_url = f"https://localhost:{port}"
        with httpx.Client(base_url=base_url, verify=str(tls.ca_cert), timeout=30) as probe:
            deadline = time.monotonic() + 90
            while True:
                if processes[0].poll() is not None:
                    raise RuntimeError(f"flglm serve exited; see {log_path}")
                try:
                    if probe.get("/api/v1/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("flglm serve did not answer /api/v1/health within 90 s")
                time.sleep(0.3)
        yield ServedBackend(base_url, tls.ca_cert, processes[0].pid)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


@contextmanager
def running_backend(work_dir: Path, threads: int, executor: str, replicas: int) -> Iterator[BenchBackend]:
    """`flglm serve --self-signed` (and, for Celery, one `flglm worker` per replica) as subprocesses."""
    data_dir = work_dir / "backend"
    workers = []
    if executor == "celery":
        import redis

        # A fresh SQLite numbers jobs from 1 again: blobs and replay guards of an earlier run must go.
        redis.Redis.from_url(REDIS_URL).flushdb()
        for replica in range(replicas):
            args = [
                "--replica",
                str(replica),
                "--loglevel",
                "warning",
                "--hostname",
                f"flglm-bench-r{replica}@%h",
            ]
            workers.append(args + (["--no-default-queue"] if replica > 0 else []))
    with (
        serve_subprocesses(work_dir, data_dir, bench_env(threads, data_dir, executor), workers) as served,
        httpx.Client(base_url=served.base_url, verify=str(served.ca_cert), timeout=60) as admin,
    ):
        yield BenchBackend(served.base_url, served.ca_cert, admin)


class CentralizedReference:
    """The in-process centralized trainer, kept loaded; timed on a mode's batches right before that mode."""

    def __init__(self, config: StackBenchConfig) -> None:
        import torch

        from flglm.adapters import AdapterSpec, add_split_adapters
        from flglm.models import load_model, load_tokenizer
        from flglm.split import SplitPlan, split_model
        from flglm.trainers import CentralizedTrainer, TrainConfig

        torch.set_num_threads(config.threads)
        self.config = config
        self.device = torch.device(config.centralized_device)
        model = load_model(config.model)
        add_split_adapters(split_model(model, SplitPlan(**SPLIT_PLAN)), AdapterSpec(**ADAPTER), seed=0)
        self.trainer = CentralizedTrainer(model.to(self.device), TrainConfig(**TRAIN))
        self.tokenizer = load_tokenizer(config.model)
        self.trainer.train_step(self.batch(0, 0))  # warm-up, as the clients' step 0

    def batch(self, client: int, step: int) -> dict[str, Any]:
        from apps.bench.stack_batches import stack_bench_batch

        batch = stack_bench_batch(self.tokenizer, self.config.batch_size, self.config.seq_len, client, step)
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def measure(self, clients: int) -> dict[str, Any]:
        """Exactly the batches of clients 0..clients-1, steps 1..S: one optimizer step per client batch."""
        batches = [self.batch(c, s) for s in range(1, self.config.steps + 1) for c in range(clients)]
        start, cpu_start = time.perf_counter(), time.process_time()
        for item in batches:
            self.trainer.train_step(item)  # returns the loss as a float: the step has finished on a GPU too
        seconds = time.perf_counter() - start
        tokens = sum(int(item["attention_mask"].sum()) for item in batches)
        return {
            "steps": len(batches),
            "batch": [self.config.batch_size, int(batches[0]["input_ids"].shape[1])],
            "tokens": tokens,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_start,
            "tokens_per_s": tokens / seconds,
        }


def enroll_client(backend: BenchBackend, name: str, key_file: Path) -> tuple[int, str]:
    from flglm.wire.keys import ClientKeyPair

    keypair = ClientKeyPair.generate()
    keypair.save(key_file)
    token = backend.call("POST", "/clients/enrollment-tokens", json={"name": name})["token"]
    enrolled = backend.admin.post(
        "/api/v1/agent/enroll", json={"token": token, "public_key": keypair.public_b64, "example_count": 1}
    )
    if enrolled.status_code != 201:
        raise RuntimeError(f"enroll {name}: HTTP {enrolled.status_code} {enrolled.text[:300]}")
    body = enrolled.json()
    return int(body["client_id"]), str(body["credential"])


def run_mode(
    backend: BenchBackend, config: StackBenchConfig, name: str, work_dir: Path, hidden: int
) -> dict[str, Any]:
    """One job of `name`'s shape, its clients as processes; aggregate figures of their timed steps."""
    parallel_mode, clients, replicas = MODES[name]
    mode_dir = work_dir / name
    mode_dir.mkdir()
    owners = []
    for index in range(clients):
        client_name = f"bench-{name}-{index}".replace("_", "-")
        key_file = mode_dir / f"client-{index}.key"
        client_id, credential = enroll_client(backend, client_name, key_file)
        owners.append((index, client_name, client_id, credential, key_file))
    spec = {
        "name": f"bench-{name}",
        "model_ref": config.model,
        "task_type": "generation",
        "split_plan": SPLIT_PLAN,
        "adapter": ADAPTER,
        "hyperparameters": {
            **TRAIN,
            "batch_size": config.batch_size,
            "max_batch_size": config.batch_size * clients,
            "max_seq_len": config.seq_len,
            "batch_window_s": 600.0,  # a batch waits for every client of the step (no straggler drops)
            "server_fedavg_every": config.steps + 1,
        },
        "parallel_mode": parallel_mode,
        "replicas": replicas,
        "rounds": 1,
        "steps_per_round": config.steps + 1,
        "min_clients": clients,
        "round_timeout_s": 3600,
        "start": "manual",  # the bench starts it itself, right after the approvals
        "clients": [owner[1] for owner in owners],
    }
    job_id = int(backend.call("POST", "/jobs", json=spec)["id"])
    backend.call("POST", f"/jobs/{job_id}/open")
    for owner in owners:
        backend.call("POST", f"/agent/invitations/{job_id}/decision", owner[3], json={"decision": "approve"})
    backend.call("POST", f"/jobs/{job_id}/start")
    server_public_key = backend.call("GET", f"/agent/jobs/{job_id}", owners[0][3])["server_public_key"]
    env = bench_env(config.threads, work_dir / "backend", config.executor)
    processes = []
    for index, _, client_id, credential, key_file in owners:
        client_config = {
            "model": config.model,
            "split_plan": SPLIT_PLAN,
            "adapter": ADAPTER,
            "train": TRAIN,
            "seed": 0,
            "threads": config.threads,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "seq_len": config.seq_len,
            "client_index": index,
            "job_id": job_id,
            "client_id": client_id,
            "credential": credential,
            "key_file": str(key_file),
            "server_public_key": server_public_key,
            "base_url": backend.base_url,
            "ca_cert": str(backend.ca_cert),
        }
        config_file = mode_dir / f"client-{index}.json"
        config_file.write_text(json.dumps(client_config))
        config_file.chmod(0o600)
        with (mode_dir / f"client-{index}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "apps.bench.stack_client", str(config_file)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            )
    reports = []
    for index, process in enumerate(processes):
        out, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            job = backend.call("GET", f"/jobs/{job_id}")
            log_tail = (mode_dir / f"client-{index}.log").read_text()[-2000:]
            raise RuntimeError(
                f"{name}: client {index} exited {process.returncode} (job {job['status']}: "
                f"{job['failure_reason']}); logs in {work_dir}:\n{log_tail}"
            )
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    backend.call("POST", f"/jobs/{job_id}/cancel")
    return mode_figures(name, reports, hidden)


def mode_figures(name: str, reports: Sequence[dict[str, Any]], hidden: int) -> dict[str, Any]:
    parallel_mode, clients, replicas = MODES[name]
    steps = [step for report in reports for step in report["steps"]]
    seconds = max(s["end"] for s in steps) - min(s["start"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    wire = sum(s["bytes_up"] + s["bytes_down"] for s in steps)
    raw = sum(4 * s["rows"] * s["seq"] * hidden * 4 for s in steps)  # h0, h1, dL/dh1, dL/dh0 in float32
    return {
        "parallel_mode": parallel_mode,
        "clients": clients,
        "replicas": replicas,
        "timed_steps_per_client": len(steps) // clients,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "mean_client_step_s": sum(s["end"] - s["start"] for s in steps) / len(steps),
        "wire_bytes": wire,
        "wire_bytes_per_token": wire / tokens,
        "raw_tensor_bytes": raw,
        "raw_tensor_bytes_per_token": raw / tokens,
        "wire_over_raw": wire / raw,
        "final_losses": [report["steps"][-1]["loss"] for report in reports],
    }


def run_stack_bench(config: StackBenchConfig, work_dir: Path | None = None) -> dict[str, Any]:
    """Every figure of `flglm bench` as one JSON-able dict (subprocess logs under `work_dir` if given)."""
    from flglm.models import load_config

    hidden = int(load_config(config.model).hidden_size)
    load_before = os.getloadavg()
    reference = CentralizedReference(config)
    modes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flglm-bench-") as scratch:
        root = work_dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        replicas = max(MODES[m][2] for m in config.modes)
        with running_backend(root, config.threads, config.executor, replicas) as backend:
            for name in config.modes:
                # Right before the mode, on its very batches: machine load drifts on a shared machine.
                centralized = reference.measure(MODES[name][1])
                figures = run_mode(backend, config, name, root, hidden)
                figures["centralized"] = centralized
                figures["ratio_to_centralized"] = figures["tokens_per_s"] / centralized["tokens_per_s"]
                # The paper's form: wall time for the same tokens relative to centralized (1.8x, 1.28x).
                figures["time_ratio_to_centralized"] = 1 / figures["ratio_to_centralized"]
                target = TARGETS.get(figures["parallel_mode"])
                figures["target"] = target
                figures["meets_target"] = (
                    None if target is None else figures["ratio_to_centralized"] >= target
                )
                modes[name] = figures
    tokens = sum(m["centralized"]["tokens"] for m in modes.values())
    seconds = sum(m["centralized"]["seconds"] for m in modes.values())
    return {
        "bench": "stack",
        "model": config.model,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "threads_per_process": config.threads,
        "executor": config.executor,
        "centralized_device": config.centralized_device,
        "wire_dtype": "float32",
        "adapters": "lora r=8 all-linear on front, body and back",
        "cpu_count": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "centralized": {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds},
        "modes": modes,
        "targets": TARGETS,
        "published_llama2_7b": PUBLISHED,
    }


def stack_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (the README's)."""
    central = result["centralized"]
    lines = [
        "| run | clients | replicas | tokens/s | centralized tokens/s (same batches) | ratio to centralized "
        "| target | time vs centralized | wire bytes/token | wire / raw tensor bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| centralized (in-process, all) | - | - | {central['tokens_per_s']:.1f} | - | 1.000 | - | 1.00x "
        "| - | - |",
    ]
    for name, m in result["modes"].items():
        target = "-" if m["target"] is None else f"≥ {m['target']:.2f}"
        lines.append(
            f"| {name} | {m['clients']} | {m['replicas']} | {m['tokens_per_s']:.1f} "
            f"| {m['centralized']['tokens_per_s']:.1f} "
            f"| {m['ratio_to_centralized']:.3f} | {target} | {m['time_ratio_to_centralized']:.2f}x "
            f"| {m['wire_bytes_per_token']:.0f} "
            f"| {m['wire_over_raw']:.4f} |"
        )
    return "\n".join(lines)
