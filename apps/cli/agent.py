"""`flglm agent ...`: the data owner's client agent (enroll, jobs, approve/decline, run, status)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from client_agent.api import EXIT_CODES_HELP, AgentFailure, ControlPlaneClient, ExitCode, failure_from
from client_agent.privacy import consent_lines, job_privacy, model_hidden_size
from client_agent.state import (
    Enrollment,
    JobCheckpoint,
    StateError,
    approved_jobs,
    load_enrollment,
    private_key_path,
    record_decision,
    resolve_state_dir,
    save_enrollment,
)
from flglm import protocol
from flglm.data.files import DataError  # torch-free: the light verbs stay light
from flglm.step_client import StepUnauthorized

app = typer.Typer(
    help="The data owner's client agent: keeps its data, front and back blocks and loss local; talks to the "
    "control plane over outbound HTTPS only. " + EXIT_CODES_HELP,
    no_args_is_help=True,
)

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", envvar="FLGLM_AGENT_STATE", help="agent state directory (default ~/.flglm-agent)"
    ),
]
T = TypeVar("T")


def _guarded(action: Callable[[], T]) -> T:
    """Run `action`; a known failure prints one `error: ...` line and exits with its code."""
    try:
        return action()
    except StateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.bad_usage_or_data) from None
    except AgentFailure as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except DataError as exc:
        typer.echo(f"error: bad data: {exc} (nothing was sent)", err=True)
        raise typer.Exit(ExitCode.bad_usage_or_data) from None
    except typer.Exit:
        raise
    except Exception as exc:
        failure = failure_from(exc)
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(failure.exit_code) from None


def _client(state_dir: Path) -> ControlPlaneClient:
    enrollment = load_enrollment(state_dir)
    return ControlPlaneClient(enrollment.server_url, enrollment.credential, enrollment.ca_cert)


@app.command()
def enroll(
    server: Annotated[str, typer.Option("--server", help="control plane base URL, https://...")],
    token: Annotated[str, typer.Option("--token", help="one-time enrollment token from the operator")],
    ca_cert: Annotated[
        Path | None,
        typer.Option("--ca-cert", help="CA that signed the server certificate (default: system CAs)"),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="expected client name (checked against the token)")
    ] = None,
    state_dir: StateDir = None,
) -> None:
    """Generate this agent's X25519 key pair; trade the enrollment token for a credential (stored 0600)."""
    from flglm.wire.keys import ClientKeyPair

    def action() -> None:
        directory = resolve_state_dir(state_dir)
        keypair = ClientKeyPair.generate()
        ca = str(ca_cert.resolve()) if ca_cert else None
        with ControlPlaneClient(server, None, ca) as client:
            try:
                body = client.enroll(protocol.EnrollRequest(token=token, public_key=keypair.public_b64))
            except StepUnauthorized as exc:  # not a running agent's revoked credential: say which token
                raise AgentFailure(
                    ExitCode.revoked,
                    f"the server refused the enrollment token: {exc.message} — ask the operator for a new "
                    "one (`flglm client enroll-token NAME`)",
                ) from None
        if name is not None and name != body.name:
            typer.echo(f"warning: the token was issued for client {body.name!r}, not {name!r}", err=True)
        keypair.save(private_key_path(directory))
        save_enrollment(
            directory,
            Enrollment(server, body.client_id, body.name, body.credential, body.server_public_key, ca),
        )
        typer.echo(f"enrolled as {body.name!r} (client {body.client_id}); state in {directory}")

    _guarded(action)


@app.command()
def jobs(state_dir: StateDir = None) -> None:
    """Invitations: model, task, rounds and what will be shared if you approve."""

    def action() -> None:
        with _client(resolve_state_dir(state_dir)) as client:
            invitations = client.invitations()
        if not invitations:
            typer.echo("no invitations")
        sizes: dict[str, int | None] = {}
        for job in invitations:
            typer.echo(
                f"job {job.job_id} {job.name!r}: {job.consent.value} (job {job.job_status.value})\n"
                f"  model {job.model_ref}, task {job.task_type.value}, {job.rounds} rounds x "
                f"{job.steps_per_round} steps, {job.parallel_mode.value}"
            )
            try:
                privacy = job_privacy(job.job_id, job.privacy)
            except AgentFailure as exc:  # settings this agent does not apply: say so, never guess
                typer.echo(f"  {exc}")
                continue
            if privacy.activation_noise > 0 and job.model_ref not in sizes:  # ε needs the hidden size
                sizes[job.model_ref] = model_hidden_size(job.model_ref)
            lines = consent_lines(job, sizes.get(job.model_ref))
            typer.echo(
                "\n".join(f"  {line}" for line in lines)
                + "\n  also shared: per-step loss, token counts and timings; the example count only with "
                "--share-example-count\n"
                "  never shared: your text, token ids, labels, logits"
            )

    _guarded(action)


def _decide(job_id: int, decision: protocol.ConsentDecision, state_dir: Path | None) -> None:
    def action() -> None:
        directory = resolve_state_dir(state_dir)
        with _client(directory) as client:
            if decision is protocol.ConsentDecision.approve:
                # Approving settings this agent would not apply is consenting to defences it lacks.
                for invitation in client.invitations():
                    if invitation.job_id == job_id:
                        job_privacy(job_id, invitation.privacy)
            view = client.decide(job_id, decision)
        record_decision(directory, job_id, decision is protocol.ConsentDecision.approve)
        typer.echo(f"job {job_id} {view.name!r}: {view.consent.value}")

    _guarded(action)


@app.command()
def approve(job_id: Annotated[int, typer.Argument(help="job id")], state_dir: StateDir = None) -> None:
    """Approve a job: this agent will train it when it runs."""
    _decide(job_id, protocol.ConsentDecision.approve, state_dir)


@app.command()
def decline(job_id: Annotated[int, typer.Argument(help="job id")], state_dir: StateDir = None) -> None:
    """Decline a job: this agent never works on it."""
    _decide(job_id, protocol.ConsentDecision.decline, state_dir)


@app.command()
def run(
    data: Annotated[Path, typer.Option("--data", help="your data file (.jsonl or .csv); it never leaves")],
    share_example_count: Annotated[
        bool,
        typer.Option(
            help="tell the server how many examples you train on (FedAvg weight); off: equal weight"
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    stop_when_done: Annotated[
        bool, typer.Option("--stop-when-done", help="exit 0 once every approved job is over")
    ] = False,
    poll_s: Annotated[float, typer.Option("--poll-s", min=0.05, help="seconds between work polls")] = 2.0,
    max_outage: Annotated[
        float,
        typer.Option(
            "--max-outage",
            min=0,
            max=7 * 24 * 3600,
            help="seconds to keep trying while the server is unreachable, resuming where it stopped; then "
            "exit 5 (the server drops an agent silent for longer than its heartbeat lease)",
        ),
    ] = 900.0,
    memory_log: Annotated[
        Path | None,
        typer.Option(
            "--memory-log",
            help="append this agent's resident memory at each phase (started, loaded, every step, "
            "evaluation) to FILE as JSON lines; read by `flglm bench memory`",
        ),
    ] = None,
    state_dir: StateDir = None,
) -> None:
    """Heartbeat, pull work for approved jobs, train, report metrics; resumes from the state directory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    def action() -> ExitCode:
        from flglm.process_memory import return_large_blocks_to_the_os

        return_large_blocks_to_the_os()  # before any tensor: resident memory follows what is live
        from client_agent.runner import RunOptions, run_agent

        options = RunOptions(
            data.resolve(),
            share_example_count,
            quiet,
            stop_when_done,
            poll_s,
            max_outage_s=max_outage,
            memory_log=memory_log.resolve() if memory_log else None,
        )
        return run_agent(resolve_state_dir(state_dir), options)

    code = _guarded(action)
    if code is ExitCode.done:
        typer.echo("every approved job completed", err=True)
    else:
        typer.echo("error: an approved job failed or was cancelled (see `flglm agent jobs`)", err=True)
    raise typer.Exit(code)


@app.command()
def status(state_dir: StateDir = None) -> None:
    """Enrollment, server view of this agent, approvals and local job positions (JSON)."""

    def action() -> None:
        directory = resolve_state_dir(state_dir)
        enrollment = load_enrollment(directory)
        with _client(directory) as client:
            beat = client.heartbeat(None)
        positions = {}
        for job_id in sorted(approved_jobs(directory)):
            position = JobCheckpoint(directory, job_id).position()
            positions[str(job_id)] = position.__dict__ if position else None
        report = {
            "server": enrollment.server_url,
            "client_id": enrollment.client_id,
            "name": enrollment.name,
            "status": beat.status.value,
            "state_dir": str(directory),
            "approved_jobs": positions,
        }
        typer.echo(json.dumps(report, indent=2))

    _guarded(action)
