"""`flglm bench`: side-by-side benchmarks that report ratios measured in one run."""

from pathlib import Path

import typer

from flglm.protocol import AGENT_HEARTBEAT_S, AGENT_POLL_S, AGENT_WORK_WAIT_S
from flglm.step_protocol import MAX_LONG_POLL_S

app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=False)


@app.callback(invoke_without_command=True)
def stack(
    ctx: typer.Context,
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
    model: str = typer.Option("smollm2-135m", help="Model ref: smollm2-135m, tiny:llama (quick check)."),
    steps: int = typer.Option(4, min=1, help="Timed steps per client (after one warm-up step)."),
    batch_size: int = typer.Option(4, min=1, help="Rows per client batch."),
    seq_len: int = typer.Option(64, min=2, help="Tokens per row."),
    threads: int = typer.Option(1, min=1, help="Torch threads of every process (centralized included)."),
    modes: str = typer.Option(
        "sequential,client_batch_2,client_batch_4,server_hierarchical_2",
        help="Comma-separated full-stack modes to run.",
    ),
    executor: str = typer.Option("inprocess", help="Server executor: inprocess (embedded) or celery."),
    centralized_device: str = typer.Option(
        "cpu", help="Device of the centralized reference: cpu, or cuda where the server body has a GPU."
    ),
    work_dir: Path | None = typer.Option(None, help="Keep backend/client logs here (default: a temp dir)."),
) -> None:
    """Full stack (HTTPS backend, sealed tensors, client processes) vs the centralized trainer: tokens/s."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from apps.bench.stack import StackBenchConfig, run_stack_bench, stack_table

    try:
        config = StackBenchConfig(
            model=model,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            threads=threads,
            modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
            executor=executor,
            centralized_device=centralized_device,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = run_stack_bench(config, work_dir)
    typer.echo(stack_table(result))
    if not json_output:
        return
    typer.echo(json.dumps(result))


@app.command("wire")
def wire(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
    model: str = typer.Option(
        "smollm2-135m", help="Model whose split step the crypto time is compared with."
    ),
    step_batches: int = typer.Option(3, min=0, help="Timed split steps per wire dtype (0: skip the model)."),
    loss_model: str = typer.Option("tiny:llama", help="Model of the wire-dtype loss comparison."),
    loss_steps: int = typer.Option(60, min=0, help="Steps per wire dtype in the loss comparison (0: skip)."),
    repeats: int = typer.Option(5, min=1, help="Timed repeats of the (8, 512, 4096) seal/open throughput."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's choice)."),
) -> None:
    """Secure wire format: seal/open throughput, crypto share of a split step, wire dtype vs loss."""
    import json

    from apps.bench.wire import run_wire_bench

    result = run_wire_bench(
        model_ref=model,
        step_batches=step_batches,
        loss_model_ref=loss_model,
        loss_steps=loss_steps,
        repeats=repeats,
        threads=threads,
    )
    if not json_output:
        throughput = result["throughput"]
        round_trip_ms = throughput["round_trip_s"] * 1e3
        typer.echo(
            f"seal+open of {throughput['shape']} {throughput['dtype']}: {round_trip_ms:.1f} ms "
            f"({throughput['round_trip_mb_per_s']:.0f} MB/s)"
        )
        for name, figures in result.get("split_step", {}).items():
            if name.startswith("wire_"):
                crypto_ms = figures["crypto_s_per_step"] * 1e3
                typer.echo(
                    f"{name}: step {figures['step_s']:.2f} s, seal+open {crypto_ms:.1f} ms "
                    f"= {figures['crypto_fraction'] * 100:.2f} % of the step"
                )
        for name in ("float32", "bfloat16", "float16"):
            if name in result.get("wire_dtype_loss", {}):
                figures = result["wire_dtype_loss"][name]
                typer.echo(
                    f"wire {name}: final loss {figures['final_loss']:.4f} "
                    f"(max |diff| vs float32 {figures['max_abs_diff_vs_float32']:.4f})"
                )
    typer.echo(json.dumps(result))


@app.command("split")
def split(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
    model: str = typer.Option("smollm2-135m", help="Model ref: smollm2-135m, tiny:<arch>, a dir."),
    batch_size: int = typer.Option(4, min=1, help="Rows per training step."),
    seq_len: int = typer.Option(64, min=2, help="Tokens per row."),
    rounds: int = typer.Option(10, min=1, help="Timed steps per trainer, interleaved."),
    front_layers: int = typer.Option(1, min=1, help="Decoder layers in the client's input block."),
    back_layers: int = typer.Option(1, min=1, help="Decoder layers in the client's output block."),
    memory: bool = typer.Option(True, help="Measure client vs full resident memory."),
    threads: int = typer.Option(0, min=0, help="Torch CPU threads (0: torch's default)."),
) -> None:
    """Cost of the split: centralized vs split step time (ratio of medians) and client vs full memory."""
    import json

    from apps.bench.split import run_split_bench

    result = run_split_bench(
        model_ref=model,
        batch_size=batch_size,
        seq_len=seq_len,
        rounds=rounds,
        front_layers=front_layers,
        back_layers=back_layers,
        memory=memory,
        threads=threads,
    )
    if not json_output:
        step = result["step_time"]
        typer.echo(
            f"{model} batch {step['batch']}: centralized {step['centralized_step_s']:.3f} s/step, "
            f"split {step['split_step_s']:.3f} s/step, ratio {step['ratio_centralized_over_split']:.3f} "
            f"(target >= {step['target_ratio']}); "
            f"CPU-time ratio {step['cpu_ratio_centralized_over_split']:.3f}"
        )
        if "client_memory" in result:
            mem = result["client_memory"]
            typer.echo(
                f"client/full: parameters {mem['parameter_bytes_ratio']:.3f}, "
                f"resident {mem['client_rss_bytes'] / 2**20:.0f}/{mem['full_rss_bytes'] / 2**20:.0f} MiB "
                f"= {mem['rss_ratio']:.3f} (loaded part only {mem['loaded_rss_ratio']:.3f})"
            )
        typer.echo(f"Llama-7B client/full parameters: {result['llama_7b']['client_ratio']:.3f}")
    typer.echo(json.dumps(result))


@app.command("load")
def load(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
    agents: int = typer.Option(200, min=1, help="Simulated agents in the job (one holdout more)."),
    idle_agents: int = typer.Option(50, min=0, help="Simulated agents in no job, waiting for work."),
    seconds: float = typer.Option(60.0, min=1.0, help="Timed window, in seconds."),
    heartbeat_s: float = typer.Option(AGENT_HEARTBEAT_S, min=0.1, help="Each agent's heartbeat interval."),
    work_wait_s: float = typer.Option(
        AGENT_WORK_WAIT_S, min=0.0, help="wait_s of each work long-poll; 0: poll every --poll-s instead."
    ),
    poll_s: float = typer.Option(AGENT_POLL_S, min=0.1, help="Pause between two work requests."),
    wait_s: float = typer.Option(MAX_LONG_POLL_S, min=0.1, help="wait_s of each step-result long-poll."),
    operator_s: float = typer.Option(1.5, min=0.1, help="The operator's job-page poll interval."),
    database_url: str = typer.Option(
        "", help="PostgreSQL server URL (default: FLGLM_DATABASE_URL, else the local test database)."
    ),
    work_dir: Path | None = typer.Option(None, help="Keep the backend's log here (default: a temp dir)."),
) -> None:
    """One backend (PostgreSQL, Celery) under N agents' heartbeats, work requests and long-polls, at the
    agent's own cadence by default: latencies per route."""
    import json

    from apps.bench.load import LoadBenchConfig, load_table, run_load_bench

    try:
        config = LoadBenchConfig(
            agents=agents,
            idle_agents=idle_agents,
            seconds=seconds,
            heartbeat_s=heartbeat_s,
            work_wait_s=work_wait_s,
            poll_s=poll_s,
            wait_s=wait_s,
            operator_s=operator_s,
            database_url=database_url,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = run_load_bench(config, work_dir)
    if not json_output:
        typer.echo(load_table(result))
        return
    typer.echo(json.dumps(result))


@app.command("memory")
def memory(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
    model: str = typer.Option("smollm2-135m", help="Model ref (tiny:llama for a quick run)."),
    agents: int = typer.Option(3, min=1, max=16, help="Real `flglm agent run` processes."),
    rounds: int = typer.Option(5, min=1, max=1000, help="Rounds."),
    steps_per_round: int = typer.Option(17, min=1, max=10_000, help="Steps per round."),
    batch_size: int = typer.Option(8, min=1, max=256, help="Rows per client batch."),
    max_seq_len: int = typer.Option(96, min=8, max=4096, help="Tokens per row at most."),
    eval_examples: int = typer.Option(
        32, min=0, max=10_000, help="Held-out examples each agent scores per round."
    ),
    executor: str = typer.Option(
        "celery", help="celery (a `flglm worker`) or inprocess (body in `flglm serve`)."
    ),
    sample_s: float = typer.Option(0.2, min=0.01, max=10.0, help="Seconds between RSS samples."),
    plot: Path | None = typer.Option(
        None, help="Write a PNG of memory over the run here (e.g. docs/memory.png)."
    ),
    timeout_s: float = typer.Option(7200.0, min=1.0, help="Give up when the job runs longer."),
    database_url: str = typer.Option(
        "", help="PostgreSQL server URL (default: FLGLM_DATABASE_URL, else the local test database)."
    ),
    work_dir: Path | None = typer.Option(None, help="Keep logs and samples here (default: a temp dir)."),
) -> None:
    """Every process's resident memory through a real job: per phase, slope, and the replica's terms."""
    import json

    from apps.bench.memory import MemoryBenchConfig, memory_table, run_memory_bench

    try:
        config = MemoryBenchConfig(
            model_ref=model,
            agents=agents,
            rounds=rounds,
            steps_per_round=steps_per_round,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            eval_examples=eval_examples,
            executor=executor,
            sample_s=sample_s,
            timeout_s=timeout_s,
            database_url=database_url,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = run_memory_bench(config, work_dir)
    if plot is not None:
        from apps.bench.memory_plot import plot_memory

        plot_memory(result, plot)
    typer.echo(json.dumps(result) if json_output else memory_table(result))
    if result["job"]["status"] != "completed":
        raise typer.Exit(1)


@app.command("longrun")
def longrun(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
    steps: int = typer.Option(1000, min=1, help="Steps per client over the whole job."),
    rounds: int = typer.Option(10, min=1, help="Rounds (steps must be a multiple of them)."),
    agents: int = typer.Option(2, min=1, help="Real `flglm agent run` processes."),
    batch_size: int = typer.Option(2, min=1, help="Rows per client batch."),
    timeout_s: float = typer.Option(3600.0, min=1.0, help="Give up when the job runs longer."),
    database_url: str = typer.Option(
        "", help="PostgreSQL server URL (default: FLGLM_DATABASE_URL, else the local test database)."
    ),
    work_dir: Path | None = typer.Option(None, help="Keep backend/agent logs here (default: a temp dir)."),
) -> None:
    """A long tiny-model job (Celery, real agents): exactly-once, Redis keys, rows and RSS left behind."""
    import json

    from apps.bench.longrun import LongRunConfig, longrun_table, run_longrun_bench

    try:
        config = LongRunConfig(
            steps=steps,
            rounds=rounds,
            agents=agents,
            batch_size=batch_size,
            timeout_s=timeout_s,
            database_url=database_url,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = run_longrun_bench(config, work_dir)
    typer.echo(json.dumps(result) if json_output else longrun_table(result))
    if not result["ok"]:
        raise typer.Exit(1)
