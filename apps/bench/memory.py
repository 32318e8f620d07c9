"""`flglm bench memory`: every process's resident memory through a real job, per phase, and what it holds.

A real run: `flglm serve --self-signed` on PostgreSQL (a fresh schema, dropped afterwards) with the Celery
executor and one `flglm worker --replica 0` (or the body embedded in `flglm serve` with `--executor
inprocess`), and `agents` real `flglm agent run --memory-log FILE` processes training one `client_batch`
classification job. A sampler reads every process's resident set (RSS, its children included) every
`sample_s`; each agent's memory log marks its phases (started, loaded, each step, evaluation). Per process
the bench reports: after import, after loading, peak in training, peak in evaluation, the peak (VmHWM), and
the slope over the last half of the run (agents: RSS after each step against the step; server processes: RSS
against the client steps reported). For the server replica it also reports what its peak should be made of,
each term measured here in-process on the same model and batch shape: the body's weights, its adapters with
their gradients and AdamW state, and the autograd graph of one step in flight (the bytes of the tensors the
body's forward saves for its backward, counted by `torch.autograd.graph.saved_tensors_hooks`).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from apps.bench.load import bench_workspace, running_backend
from apps.bench.longrun import Agent, child_pids, run_agents_job
from flglm.process_memory import peak_resident_bytes

REDIS_URL = "redis://127.0.0.1:6379/9"  # a database of its own (load: 11, stack: 13, longrun: 6, tests: 4-15)
TINY_LABELS = ["marmalade", "tangerine"]
TINY_WORDS = ["quokka", "zeppelin", "harbour", "obsidian", "lantern", "walrus", "fjord", "cobalt"]
MIB = 2**20


@dataclass(frozen=True)
class MemoryBenchConfig:
    """The run measured: the demo's settings by default (SmolLM2, 3 agents, 5 rounds x 17 steps of 8)."""

    model_ref: str = "smollm2-135m"
    agents: int = 3
    rounds: int = 5
    steps_per_round: int = 17
    batch_size: int = 8
    max_seq_len: int = 96
    eval_examples: int = 32
    executor: str = "celery"
    sample_s: float = 0.2
    timeout_s: float = 7200.0
    database_url: str = ""  # empty: FLGLM_DATABASE_URL, else the local test database (bench_workspace)

    def __post_init__(self) -> None:
        if min(self.agents, self.rounds, self.steps_per_round, self.batch_size) < 1:
            raise ValueError("agents, rounds, steps per round and batch size must be >= 1")
        if self.executor not in ("celery", "inprocess"):
            raise ValueError(f"executor must be celery or inprocess, not {self.executor!r}")
        if not 0.01 <= self.sample_s <= 10:
            raise ValueError("sample_s must be within [0.01, 10]")


# ---- the data and the job -------------------------------------------------------------------------------


def write_agent_data(config: MemoryBenchConfig, root: Path, count: int) -> tuple[list[Path], list[str]]:
    """One data file per agent and the label set: the demo's news corpus split with extreme label skew for a
    real model, made-up rows for a tiny one."""
    if config.model_ref.startswith("tiny:"):
        rng = random.Random(0)
        paths = []
        for owner in range(count):
            path = root / f"owner-{owner}.jsonl"
            rows = [
                {"text": " ".join(rng.choice(TINY_WORDS) for _ in range(12)), "label": TINY_LABELS[i % 2]}
                for i in range(64)
            ]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            paths.append(path)
        return paths, TINY_LABELS
    from flglm.corpora import write_demo_data_dir

    written = write_demo_data_dir(root / "data", count, "extreme", seed=0, eval_per_label=8)
    clients = sorted(p for p in written if p.name.startswith("client-"))
    labels = json.loads((root / "data" / "labels.json").read_text())["labels"]
    return clients, list(labels)


def job_spec(config: MemoryBenchConfig, names: list[str], labels: list[str]) -> dict[str, Any]:
    """The measured job: `client_batch` classification with local evaluation after every round."""
    return {
        "name": "bench-memory",
        "model_ref": config.model_ref,
        "task_type": "classification",
        "split_plan": {"front_layers": 1, "back_layers": 1},
        "adapter": {"r": 8, "alpha": 16},
        "hyperparameters": {
            "lr": 1e-3,
            "batch_size": config.batch_size,
            "labels": labels,
            "max_batch_size": config.batch_size * config.agents,
            "max_seq_len": config.max_seq_len,
            "eval_fraction": 0.1,
            "eval_examples": config.eval_examples,
            "batch_window_s": 30.0,
        },
        "parallel_mode": "client_batch",
        "rounds": config.rounds,
        "steps_per_round": config.steps_per_round,
        "min_clients": len(names),
        "round_timeout_s": config.timeout_s,
        "start": "manual",
        "clients": names,
    }


# ---- sampling -------------------------------------------------------------------------------------------


def tree_rss(pid: int) -> int | None:
    """RSS of `pid` and all its descendants (a Celery worker's pool), in bytes; None once it is gone."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class Sampler:
    """A thread that samples the RSS of named processes every `interval_s`: {name: [(t, bytes), ...]}."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.pids: dict[str, int] = {}
        self.samples: dict[str, list[tuple[float, int]]] = {}
        self.progress: list[tuple[float, int]] = []  # (t, client steps reported)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.samples.setdefault(name, [])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = time.time()
            for name, pid in list(self.pids.items()):
                rss = tree_rss(pid)
                if rss is not None:
                    self.samples[name].append((now, rss))

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)


# ---- figures --------------------------------------------------------------------------------------------


def slope_per_100(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y against x, times 100 (bytes per 100 steps); None with under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return None
    return 100 * sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def read_memory_log(path: Path) -> list[dict[str, Any]]:
    """An agent's `--memory-log` events (empty when it wrote none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def agent_figures(events: list[dict[str, Any]], samples: list[tuple[float, int]]) -> dict[str, Any]:
    """Per agent: after import, after loading, peak in training and in evaluation, VmHWM, last-half slope."""
    by = {e["event"]: e for e in reversed(events)}  # the first of each kind
    steps = [e for e in events if e["event"] == "step"]
    evals = [
        (start["t"], end["t"])
        for start, end in zip(
            (e for e in events if e["event"] == "eval_start"),
            (e for e in events if e["event"] == "eval_end"),
            strict=False,
        )
    ]
    loaded_t = by["loaded"]["t"] if "loaded" in by else math.inf
    last_step_t = steps[-1]["t"] if steps else -math.inf

    def in_eval(t: float) -> bool:
        return any(a <= t <= b for a, b in evals)

    train = [rss for t, rss in samples if loaded_t <= t <= last_step_t and not in_eval(t)]
    train += [e["rss"] for e in steps]
    evaluation = [rss for t, rss in samples if in_eval(t)]
    evaluation += [e["rss"] for e in events if e["event"] in ("eval_start", "eval_end")]
    half = [(float(e["global_step"]), float(e["rss"])) for e in steps[len(steps) // 2 :]]
    return {
        "after_import_bytes": by.get("started", {}).get("rss"),
        "after_loading_bytes": by.get("loaded", {}).get("rss"),
        "peak_training_bytes": max(train, default=None),
        "peak_evaluation_bytes": max(evaluation, default=None),
        "peak_bytes": max((e["peak"] for e in events if e.get("peak")), default=None),
        "steps": len(steps),
        "evaluations": len(evals),
        "slope_last_half_bytes_per_100_steps": slope_per_100(half),
    }


def server_figures(
    samples: list[tuple[float, int]], progress: list[tuple[float, int]], peak: int | None
) -> dict[str, Any]:
    """Per server process: first sample (after import), peak sampled, VmHWM, slope against client steps over
    the last half of the run."""

    def steps_at(t: float) -> int | None:
        before = [n for pt, n in progress if pt <= t]
        return before[-1] if before else None

    pairs = [(steps_at(t), rss) for t, rss in samples]
    stepped = [(float(s), float(rss)) for s, rss in pairs if s is not None and s > 0]
    total = stepped[-1][0] if stepped else 0.0
    half = [(s, rss) for s, rss in stepped if s >= total / 2]
    return {
        "after_import_bytes": samples[0][1] if samples else None,
        "peak_sampled_bytes": max((rss for _, rss in samples), default=None),
        "peak_bytes": peak,
        "slope_last_half_bytes_per_100_steps": slope_per_100(half),
    }


def replica_terms(config: MemoryBenchConfig) -> dict[str, int]:
    """What a server replica must hold, measured in this process on the same model and batch shape: body
    weights, adapters + grads + AdamW moments, and one in-flight step's saved activations."""
    import torch

    from flglm.adapters import AdapterSpec, trainable_parameters
    from flglm.models import load_server_body_with_adapters, parameter_bytes
    from flglm.split import SplitPlan

    body = load_server_body_with_adapters(config.model_ref, SplitPlan(1, 1), AdapterSpec(r=8, alpha=16), 0)
    trainable = trainable_parameters(body)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    hidden = int(body.stack.config.hidden_size)
    rows = config.batch_size * config.agents  # client_batch: every client's rows in one server step
    h0 = torch.randn(rows, config.max_seq_len, hidden)
    mask = torch.ones(rows, config.max_seq_len, dtype=torch.long)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    weights = {p.untyped_storage().data_ptr() for p in body.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        body(h0.requires_grad_(True), mask)
    graph = sum(n for ptr, n in saved.items() if ptr not in weights)
    return {
        "body_weights_bytes": parameter_bytes(body) - adapter_bytes,
        "adapters_grads_adamw_bytes": 4 * adapter_bytes,
        "graph_per_step_bytes": graph,
        "steps_in_flight": 1,
    }


# ---- the reference: a client that holds the whole model (what whole-model FedAvg clients hold) ---------

WHOLE_MODEL_CLIENT = """
import json, sys
from flglm.process_memory import peak_resident_bytes, resident_bytes, return_large_blocks_to_the_os
return_large_blocks_to_the_os()
import torch
from flglm.adapters import AdapterSpec, add_adapters
from flglm.contracts.job_settings import Hyperparameters
from flglm.data import collate, iterate_batches, load_examples, tokenize_examples
from flglm.models import load_model, load_tokenizer
from flglm.trainers import CentralizedTrainer
ref, data, labels, batch_size, max_seq_len, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), *map(
    int, sys.argv[4:7])
torch.set_num_threads(1)
imported = resident_bytes()
tokenizer = load_tokenizer(ref)
dataset = tokenize_examples(load_examples(data, "classification", label_set=labels), tokenizer, max_seq_len)
model = add_adapters(load_model(ref), AdapterSpec(r=8, alpha=16), 0)
loaded = resident_bytes()
hp = Hyperparameters(batch_size=batch_size, max_seq_len=max_seq_len, labels=labels)
trainer = CentralizedTrainer(model, hp.train_config())
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
for _, rows in zip(range(steps), iterate_batches(dataset, batch_size, 0)):
    trainer.train_step(collate(rows, pad))
print(json.dumps({"after_import_bytes": imported, "after_loading_bytes": loaded,
                  "peak_bytes": peak_resident_bytes()}))
"""


def whole_model_client(
    config: MemoryBenchConfig, data: Path, labels: list[str], steps: int = 8
) -> dict[str, Any]:
    """Resident memory of one process training the whole model with the same LoRA, batch and data (what a
    whole-model federated client, e.g. Flower's FedAvg-LoRA, holds), with the same allocator setting."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", WHOLE_MODEL_CLIENT, config.model_ref, str(data), json.dumps(labels),
         str(config.batch_size), str(config.max_seq_len), str(steps)],
        capture_output=True, text=True, timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the whole-model reference failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1])) | {"steps": steps}


# ---- the run --------------------------------------------------------------------------------------------


def run_memory_bench(
    config: MemoryBenchConfig, work_dir: Path | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Every figure of `flglm bench memory` as one JSON-able dict (logs and samples under `work_dir`)."""
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    sampler = Sampler(config.sample_s)
    with bench_workspace(config.database_url, "memory", work_dir) as space:
        root, database_url = space.root, space.database_url
        paths, labels = write_agent_data(config, root, config.agents)
        for i in range(len(paths)):
            (root / f"agent-{i}.memory.jsonl").unlink(missing_ok=True)
        agents = [
            Agent(
                f"memory-{i}",
                root / f"state-{i}",
                path,
                root / f"agent-{i}.log",
                extra_args=("--memory-log", str(root / f"agent-{i}.memory.jsonl")),
            )
            for i, path in enumerate(paths)
        ]
        served = running_backend(root, database_url, REDIS_URL, "memory", executor=config.executor)
        with served as backend:
            sampler.watch("backend", backend.serve_pid)
            workers = child_pids("worker")
            if workers:
                sampler.watch("worker", workers[0])

            def tick(reported: int) -> None:
                sampler.progress.append((time.time(), reported))
                for i, agent in enumerate(agents):
                    if agent.process is not None and f"agent-{i}" not in sampler.pids:
                        sampler.watch(f"agent-{i}", agent.process.pid)

            spec = job_spec(config, [a.name for a in agents], labels)
            client_steps = config.rounds * config.steps_per_round * config.agents
            with sampler.running():  # agents are watched from the job's start (they load after it)
                outcome = run_agents_job(backend, agents, spec, client_steps, config.timeout_s, say, tick)
                peaks = {"backend": peak_resident_bytes(backend.serve_pid)}
                if workers:
                    peaks["worker"] = peak_resident_bytes(workers[0])
        events = {i: read_memory_log(root / f"agent-{i}.memory.jsonl") for i in range(len(agents))}
        (root / "memory-samples.json").write_text(json.dumps(sampler.samples))
        say("memory: measuring the whole-model client reference")
        reference = whole_model_client(config, paths[0], labels)  # its data lives in the work dir
    processes: dict[str, Any] = {}
    for i in range(len(agents)):
        processes[f"agent-{i}"] = agent_figures(events[i], sampler.samples.get(f"agent-{i}", []))
    for name in ("backend", "worker"):
        if name in sampler.samples:
            processes[name] = server_figures(sampler.samples[name], sampler.progress, peaks.get(name))
    say("memory: measuring the replica's terms in-process")
    terms = replica_terms(config)
    replica_name = "worker" if "worker" in processes else "backend"
    replica = processes[replica_name]
    expected = terms["body_weights_bytes"] + terms["adapters_grads_adamw_bytes"]
    expected += terms["graph_per_step_bytes"] * terms["steps_in_flight"]
    held = None
    if replica["peak_bytes"] is not None and replica["after_import_bytes"] is not None:
        held = replica["peak_bytes"] - replica["after_import_bytes"]
    agent_peaks = [p["peak_bytes"] for n, p in processes.items() if n.startswith("agent") and p["peak_bytes"]]
    return {
        "bench": "memory",
        "config": asdict(config) | {"database_url": "<server url>; fresh schema, dropped"},
        "job": {k: outcome[k] for k in ("job_id", "status", "wall_s", "agent_exits")},
        "processes": processes,
        "replica": {
            "process": replica_name,
            "terms": terms,
            "expected_bytes": expected,
            "bound_bytes": int(expected * 1.2),
            "held_bytes": held,
            "within_bound": held is not None and held <= expected * 1.2,
        },
        "agent_peak_max_bytes": max(agent_peaks, default=None),
        "whole_model_client": reference,
        "agent_peak_vs_whole_model": (
            max(agent_peaks) / reference["peak_bytes"] if agent_peaks and reference["peak_bytes"] else None
        ),
        "samples": {name: [[round(t, 3), rss] for t, rss in pts] for name, pts in sampler.samples.items()},
        "progress": [[round(t, 3), n] for t, n in sampler.progress],
        "events": {f"agent-{i}": events[i] for i in events},
        "cpu_count": os.cpu_count(),
    }


def memory_table(result: dict[str, Any]) -> str:
    """A readable report of `run_memory_bench`'s result."""

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value / MIB:.0f}"

    job = result["job"]
    lines = [
        f"job {job['job_id']}: {job['status']} in {job['wall_s']:.0f} s ({result['config']['model_ref']}, "
        f"{result['config']['agents']} agents, executor {result['config']['executor']})",
        f"{'process':<10} {'import':>7} {'loaded':>7} {'train':>7} {'eval':>7} {'peak':>7} "
        f"{'MiB/100 steps (last half)':>26}",
    ]
    for name, p in result["processes"].items():
        slope = p["slope_last_half_bytes_per_100_steps"]
        lines.append(
            f"{name:<10} {mib(p.get('after_import_bytes')):>7} {mib(p.get('after_loading_bytes')):>7} "
            f"{mib(p.get('peak_training_bytes')):>7} {mib(p.get('peak_evaluation_bytes')):>7} "
            f"{mib(p.get('peak_bytes')):>7} {'-' if slope is None else f'{slope / MIB:+.2f}':>26}"
        )
    replica = result["replica"]
    terms = replica["terms"]
    lines.append(
        f"replica ({replica['process']}): body {mib(terms['body_weights_bytes'])} + adapters/grads/AdamW "
        f"{mib(terms['adapters_grads_adamw_bytes'])} + graph {mib(terms['graph_per_step_bytes'])} x "
        f"{terms['steps_in_flight']} = {mib(replica['expected_bytes'])} MiB (+20 %: "
        f"{mib(replica['bound_bytes'])}); held above its import: {mib(replica['held_bytes'])} MiB: "
        f"{'within' if replica['within_bound'] else 'OVER'}"
    )
    whole = result["whole_model_client"]
    ratio = result["agent_peak_vs_whole_model"]
    shown = "-" if ratio is None else f"{ratio:.2f}"
    lines.append(
        f"whole-model client (same LoRA, batch, data): loaded {mib(whole['after_loading_bytes'])}, peak "
        f"{mib(whole['peak_bytes'])} MiB; the agents' highest peak is {shown} of it"
    )
    return "\n".join(lines)
