"""`flglm demo`: the embedded platform end to end on real text, federated vs centralized vs zero-shot."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Run the end-to-end demo.", no_args_is_help=False)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that `kill` (SIGTERM) also stops the server and agents it started


@app.callback(invoke_without_command=True)
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="CI-sized: a few steps, 64 eval examples")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the results as one JSON object last")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="directory with one file per client (+ eval.jsonl, labels.json)"),
    ] = None,
    model: Annotated[str, typer.Option("--model", help="model ref or local HF directory")] = "smollm2-135m",
    corpus: Annotated[str, typer.Option(help="built-in corpus: news or tweets")] = "news",
    skew: Annotated[
        str, typer.Option(help="label skew across clients: iid, dirichlet or extreme")
    ] = "dirichlet",
    seed: Annotated[int, typer.Option(help="seed of the partition, batches and adapter init")] = 0,
    rounds: Annotated[int | None, typer.Option(min=1, help="federated rounds")] = None,
    steps_per_round: Annotated[int | None, typer.Option(min=1, help="steps per round and client")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="examples per client and step")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="AdamW learning rate")] = None,
    eval_per_label: Annotated[
        int | None, typer.Option(min=1, help="held-out eval examples per label")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="where report.md and loss_curves.png go")] = Path(
        "artifacts/demo"
    ),
    work_dir: Annotated[
        Path | None,
        typer.Option("--work-dir", help="keep server/agent state and logs here (default: temporary)"),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads here and in the server (default: by load)")
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bars")] = False,
    front_layers: Annotated[int, typer.Option(min=1, help="blocks in each client's input block")] = 1,
    activation_noise: Annotated[
        float, typer.Option(min=0.0, help="h0 noise-to-clip ratio m (clipped Gaussian noise); 0: off")
    ] = 0.0,
    activation_clip: Annotated[
        float, typer.Option(min=0.0, help="h0 per-token clip c, x the public reference norm")
    ] = 1.0,
    gradient_noise: Annotated[
        float, typer.Option(min=0.0, help="dL/dh1 noise std, x the gradient's RMS; 0: off")
    ] = 0.0,
    private_front: Annotated[
        bool, typer.Option("--private-front", help="input-block adapters private to each client")
    ] = False,
    private_init_scale: Annotated[
        float, typer.Option(min=0.0, help="--private-front: start the input block s x |W| from public")
    ] = 0.0,
    decorrelation: Annotated[
        float, typer.Option(min=0.0, help="--private-front: NoPeek distance-correlation weight")
    ] = 0.0,
    audit_sequences: Annotated[
        int | None, typer.Option(min=1, max=256, help="privacy audit: sequences attacked [16; --quick 4]")
    ] = None,
    audit_seq_len: Annotated[
        int | None, typer.Option(min=4, max=256, help="privacy audit: tokens per sequence [64; --quick 16]")
    ] = None,
    no_audit: Annotated[
        bool, typer.Option("--no-audit", help="skip the privacy audit of the job's settings")
    ] = False,
) -> None:
    """Federated fine-tune (control plane + 3 agent processes over HTTPS) vs centralized vs zero-shot, then
    the privacy audit of the job's own settings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from apps.demo.pipeline import QUICK, DemoOptions, run_demo

    if skew not in ("iid", "dirichlet", "extreme"):
        raise typer.BadParameter(f"--skew must be iid, dirichlet or extreme, got {skew!r}")
    if corpus not in ("news", "tweets"):
        raise typer.BadParameter(f"--corpus must be news or tweets, got {corpus!r}")
    if data is not None and not data.is_dir():
        raise typer.BadParameter(f"--data {data}: not a directory")
    from pydantic import ValidationError

    from flglm.protocol import PrivacySpec

    privacy = {
        "activation_noise": activation_noise,
        "activation_clip": activation_clip,
        "gradient_noise": gradient_noise,
        "private_front": private_front,
        "private_init_scale": private_init_scale,
        "decorrelation": decorrelation,
    }
    try:  # refused here, before anything starts, rather than by the server after the data is prepared
        PrivacySpec.model_validate(privacy)
    except ValidationError as exc:
        raise typer.BadParameter("; ".join(str(e["msg"]) for e in exc.errors())) from None
    options = DemoOptions(
        model_ref=str(Path(model).resolve()) if Path(model).is_dir() else model,  # agents read it
        data_dir=data,
        corpus=corpus,  # type: ignore[arg-type]
        skew=skew,  # type: ignore[arg-type]
        seed=seed,
        out_dir=out,
        work_dir=work_dir,
        progress=not no_progress,
        threads=threads,
        front_layers=front_layers,
        privacy=privacy,
        audit=not no_audit,
    )
    if quick:
        options = replace(options, **QUICK)  # type: ignore[arg-type]
    overrides = {
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "batch_size": batch_size,
        "lr": lr,
        "eval_per_label": eval_per_label,
        "audit_sequences": audit_sequences,
        "audit_seq_len": audit_seq_len,
    }
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    signal.signal(signal.SIGTERM, _interrupt)
    results = run_demo(options)
    if as_json:
        typer.echo(json.dumps(results))
