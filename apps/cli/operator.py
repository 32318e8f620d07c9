"""Operator verbs over the REST API (`flglm job`, `flglm client`, `flglm token`), with httpx over HTTPS.

Every command takes `--server`, `--token` and `--ca-cert` (or FLGLM_SERVER, FLGLM_TOKEN, FLGLM_CA_CERT);
`list` and `show` print tables (`--json`: the API's answers), the others the API's JSON answer; an API error
prints `error <code>: <message>` and exits 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
import yaml
from pydantic import ValidationError

from apps.cli import tables
from flglm.contracts.validation_errors import describe_errors
from flglm.protocol import API_PREFIX, JobSpec, TaskType
from flglm.step_client import certificate_failure

job_app = typer.Typer(help="Submit and steer training jobs.", no_args_is_help=True)
client_app = typer.Typer(help="Enroll, list and revoke client agents.", no_args_is_help=True)
token_app = typer.Typer(help="List, create and revoke operators' API tokens (admin).", no_args_is_help=True)

Server = Annotated[str, typer.Option("--server", envvar="FLGLM_SERVER", help="control plane base URL")]
Token = Annotated[str, typer.Option("--token", envvar="FLGLM_TOKEN", help="operator API token")]
CaCert = Annotated[
    Path | None,
    typer.Option("--ca-cert", envvar="FLGLM_CA_CERT", help="CA that signed the server certificate"),
]
DEFAULT_SERVER = "https://localhost:8443"
AsJson = Annotated[bool, typer.Option("--json", help="the API's JSON instead of a table")]


def call_api(
    method: str, path: str, server: str, token: str, ca_cert: Path | None, raw: bool = False, **kwargs: Any
) -> Any:
    """The answer's JSON (or its bytes with `raw`); an API error is printed and exits 1."""
    verify: str | bool = str(ca_cert) if ca_cert else True
    try:
        with httpx.Client(base_url=server.rstrip("/") + API_PREFIX, verify=verify, timeout=30) as client:
            response = client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)
    except httpx.HTTPError as exc:
        if reason := certificate_failure(exc):
            typer.echo(
                f"error: the certificate of {server} could not be verified ({reason}): a certificate "
                "problem, not a network one — give the CA certificate that signed it (`flglm serve` prints "
                "its path) with --ca-cert PATH or FLGLM_CA_CERT",
                err=True,
            )
        else:
            typer.echo(f"error: cannot reach {server}: {exc}", err=True)
        raise typer.Exit(1) from None
    if response.is_error:
        try:
            error = response.json()["error"]
            problems = [f"\n  {p['field']}: {p['message']}" for p in error.get("fields") or []]
            typer.echo(f"error {error['code']}:" + ("".join(problems) or f" {error['message']}"), err=True)
        except (ValueError, KeyError, TypeError):
            typer.echo(f"error: HTTP {response.status_code}: {response.text[:500]}", err=True)
        raise typer.Exit(1)
    return response.content if raw else response.json()


def _page_params(status: str | None, limit: int, offset: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status:
        params["status"] = status
    return params


def _print(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2, sort_keys=True))


def _print_or_table(body: Any, as_json: bool, table: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(body, indent=2, sort_keys=True) if as_json else table(body))


def read_job_spec(path: Path) -> JobSpec:
    """A job file in YAML (.yaml/.yml) or JSON, validated locally so mistakes name their field at once.

    A bad file prints one line per problem (field, allowed values, did you mean) and exits 2."""
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        typer.echo(f"error: {path}: not a readable job file: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = describe_errors(exc.errors(), JobSpec)
        lines = "\n".join(f"  {problem.line()}" for problem in problems)
        typer.echo(f"error: {path}: invalid job spec (nothing was sent):\n{lines}", err=True)
        raise typer.Exit(2) from None


@job_app.command("init")
def init(
    task: Annotated[TaskType, typer.Option("--task", help="the job's task_type")] = TaskType.classification,
) -> None:
    """Print a commented job file (every field, its default and meaning): `flglm job init > job.yaml`."""
    from apps.cli.job_template import job_template

    typer.echo(job_template(task), nl=False)


@job_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="job spec, YAML or JSON")],
    open_: Annotated[bool, typer.Option("--open", help="also open it to the invited clients")] = False,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """Create a job (draft) from FILE."""
    spec = read_job_spec(file)
    job = call_api("POST", "/jobs", server, token, ca_cert, json=spec.model_dump(mode="json"))
    if open_:
        job = call_api("POST", f"/jobs/{job['id']}/open", server, token, ca_cert)
    _print(job)


@job_app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    limit: int = 50,
    offset: int = 0,
    as_json: AsJson = False,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """List jobs, newest first (a table; --json for the API's answer)."""
    page = call_api("GET", "/jobs", server, token, ca_cert, params=_page_params(status, limit, offset))
    _print_or_table(page, as_json, tables.jobs_table)


@job_app.command("show")
def show(
    job_id: int,
    as_json: AsJson = False,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """A job with what it waits for, its participants and rounds (--json for the API's answers)."""
    job = call_api("GET", f"/jobs/{job_id}", server, token, ca_cert)
    job["participants"] = call_api("GET", f"/jobs/{job_id}/participants", server, token, ca_cert)
    job["round_history"] = call_api("GET", f"/jobs/{job_id}/rounds", server, token, ca_cert)
    _print_or_table(job, as_json, tables.job_detail)


def _lifecycle_command(action: str, help_text: str) -> None:
    def command(
        job_id: int, server: Server = DEFAULT_SERVER, token: Token = "", ca_cert: CaCert = None
    ) -> None:
        _print(call_api("POST", f"/jobs/{job_id}/{action}", server, token, ca_cert))

    command.__doc__ = help_text
    job_app.command(action)(command)


_lifecycle_command("open", "Open a draft to its invited clients (waiting_for_clients).")
_lifecycle_command("start", "Start a job once min_clients approved it.")
_lifecycle_command("pause", "Pause a running job.")
_lifecycle_command("resume", "Resume a paused job.")
_lifecycle_command("cancel", "Cancel a job that has not ended.")


@client_app.command("enroll-token")
def enroll_token(
    name: Annotated[str, typer.Argument(help="the client's name (reserved now, invitable at once)")],
    expires_in: Annotated[float | None, typer.Option(help="seconds until the token expires")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="print the token alone (for `TOKEN=$(...)` in scripts)")
    ] = False,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """Create a one-time, expiring enrollment token for a data owner's agent."""
    body: dict[str, Any] = {"name": name}
    if expires_in is not None:
        body["expires_in_s"] = expires_in
    created = call_api("POST", "/clients/enrollment-tokens", server, token, ca_cert, json=body)
    if quiet:
        typer.echo(created["token"])
        return
    _print(created)


@client_app.command("list")
def list_clients(
    status: Annotated[str | None, typer.Option(help="pending, active, offline or revoked")] = None,
    limit: int = 50,
    offset: int = 0,
    as_json: AsJson = False,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """List client agents (a table; --json for the API's answer)."""
    page = call_api("GET", "/clients", server, token, ca_cert, params=_page_params(status, limit, offset))
    _print_or_table(page, as_json, tables.clients_table)


@client_app.command("revoke")
def revoke(
    client_id: int, server: Server = DEFAULT_SERVER, token: Token = "", ca_cert: CaCert = None
) -> None:
    """Revoke a client at once: its next request is refused (401); other clients are untouched."""
    _print(call_api("POST", f"/clients/{client_id}/revoke", server, token, ca_cert))


@token_app.command("list")
def list_tokens(
    limit: int = 50,
    offset: int = 0,
    as_json: AsJson = False,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """List API tokens, revoked ones included, never their secrets (a table; --json for the API's answer)."""
    page = call_api("GET", "/tokens", server, token, ca_cert, params=_page_params(None, limit, offset))
    _print_or_table(page, as_json, tables.tokens_table)


@token_app.command("create")
def create_token(
    name: Annotated[str, typer.Argument(help="who or what uses it, e.g. ci-bot")],
    role: Annotated[Literal["admin", "viewer"], typer.Option(help="viewer is read-only")] = "viewer",
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """Create a token; its secret ("token") is printed this once only."""
    body = {"name": name, "role": role}
    _print(call_api("POST", "/tokens", server, token, ca_cert, json=body))


@token_app.command("revoke")
def revoke_token(
    token_id: int, server: Server = DEFAULT_SERVER, token: Token = "", ca_cert: CaCert = None
) -> None:
    """Revoke a token at once (its next request is a 401); the last active admin token cannot be revoked."""
    _print(call_api("DELETE", f"/tokens/{token_id}", server, token, ca_cert))
