"""`flglm serve --self-signed` as a real process, driven by the operator CLI over HTTPS; `flglm db`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from typer.testing import CliRunner

from apps.cli.main import app
from tests.support.flglm_serve import ADMIN


def run_cli(env: dict[str, str], *args: str, code: int = 0) -> Any:
    """`flglm ARGS` in this process: its JSON answer, or its output when it must exit with `code` != 0."""
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, (args, result.output)
    return json.loads(result.stdout) if code == 0 else result.output


def test_operator_cli_over_https(served: tuple[str, Path], tmp_path: Path) -> None:
    base_url, ca_cert = served
    runner = CliRunner()
    env = {"FLGLM_SERVER": base_url, "FLGLM_TOKEN": ADMIN, "FLGLM_CA_CERT": str(ca_cert)}

    def flglm(*args: str, code: int = 0) -> object:
        return run_cli(env, *args, code=code)

    token = flglm("client", "enroll-token", "lab-1", "--expires-in", "600")
    assert isinstance(token, dict) and token["token"].startswith("flglm_et_")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: cli-job\nmodel_ref: smollm2-135m\ntask_type: generation\nrounds: 2\nsteps_per_round: 3\n"
        "parallel_mode: sequential\nclients: [lab-1]\nhyperparameters: {lr: 0.0001}\n"
    )
    job = flglm("job", "submit", str(spec), "--open")
    assert isinstance(job, dict) and job["status"] == "waiting_for_clients"
    listed = flglm("job", "list", "--status", "waiting_for_clients", "--json")
    assert isinstance(listed, dict) and [j["id"] for j in listed["items"]] == [job["id"]]
    shown = flglm("job", "show", str(job["id"]), "--json")
    assert isinstance(shown, dict) and shown["participants"][0]["client_name"] == "lab-1"
    table = runner.invoke(app, ["job", "list"], env=env).stdout.splitlines()
    assert table[0].split() == [
        "ID",
        "NAME",
        "STATUS",
        "ROUND",
        "TASK",
        "MODEL",
        "MODE",
        "MIN_CLIENTS",
        "CREATED",
    ]
    row = [str(job["id"]), "cli-job", "waiting_for_clients", "0/2", "generation", "smollm2-135m"]
    assert table[2].split()[:6] == row
    assert table[-1] == "1 jobs"
    detail = runner.invoke(app, ["job", "show", str(job["id"])], env=env).stdout
    assert detail.startswith(f"job {job['id']} 'cli-job': waiting_for_clients, round 0/2\n")
    assert "2 rounds x 3 steps" in detail and "lr=0.0001" in detail
    participants = detail.split("\nparticipants\n")[1].splitlines()
    assert participants[0].split() == ["ID", "CLIENT", "STATUS", "CONSENT", "DECIDED"]
    assert participants[2].split() == [str(token["client_id"]), "lab-1", "pending", "invited", "-"]
    assert detail.rstrip().endswith("rounds\nnone yet")
    refused = flglm("job", "start", str(job["id"]), code=1)
    assert "not_enough_participants" in str(refused)
    assert flglm("job", "cancel", str(job["id"]))["status"] == "cancelled"  # type: ignore[index]
    clients = flglm("client", "list", "--json")
    assert isinstance(clients, dict) and clients["items"][0]["status"] == "pending"
    client_table = runner.invoke(app, ["client", "list"], env=env).stdout.splitlines()
    assert client_table[0].split() == ["ID", "NAME", "STATUS", "EXAMPLES", "LAST_HEARTBEAT", "ENROLLED"]
    assert client_table[2].split() == [str(token["client_id"]), "lab-1", "pending", "-", "-", "-"]
    assert flglm("client", "revoke", str(token["client_id"]))["status"] == "revoked"  # type: ignore[index]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "model_ref": "m", "rounds": "many"}))
    assert "rounds" in str(flglm("job", "submit", str(bad), code=2))
    refused = str(flglm("job", "list", "--limit", "0", code=1))  # the API's 422, one line per field
    assert "error validation_error:\n  query.limit: Input should be greater than or equal to 1" in refused
    wrong_token = runner.invoke(app, ["job", "list"], env={**env, "FLGLM_TOKEN": "flglm_at_nope"})
    assert wrong_token.exit_code == 1 and "invalid_credential" in wrong_token.output
    no_ca = runner.invoke(app, ["job", "list"], env={**env, "FLGLM_CA_CERT": None})
    assert no_ca.exit_code == 1 and "CERTIFICATE_VERIFY_FAILED" in no_ca.output  # untrusted: refused


def test_token_cli_round_trip(served: tuple[str, Path]) -> None:
    """create → list (no secrets) → use → revoke → 401; viewers cannot manage tokens; last-admin guard."""
    base_url, ca_cert = served
    admin_env = {"FLGLM_SERVER": base_url, "FLGLM_TOKEN": ADMIN, "FLGLM_CA_CERT": str(ca_cert)}
    created = run_cli(admin_env, "token", "create", "ci-bot")
    assert created["role"] == "viewer" and created["token"].startswith("flglm_at_")
    listed = run_cli(admin_env, "token", "list", "--json")
    assert [(t["name"], t["role"]) for t in listed["items"]] == [
        ("bootstrap-admin", "admin"),
        ("ci-bot", "viewer"),
    ]
    assert all("token" not in item for item in listed["items"])
    assert ADMIN not in json.dumps(listed) and created["token"] not in json.dumps(listed)

    bot_env = {**admin_env, "FLGLM_TOKEN": created["token"]}
    assert run_cli(bot_env, "job", "list", "--json")["total"] == 0
    assert CliRunner().invoke(app, ["job", "list"], env=bot_env).stdout == "no jobs (total 0)\n"
    assert "insufficient_role" in run_cli(bot_env, "token", "create", "sneaky", "--role", "admin", code=1)
    assert "--role" in run_cli(admin_env, "token", "create", "x", "--role", "root", code=2)

    revoked = run_cli(admin_env, "token", "revoke", str(created["id"]))
    assert revoked["id"] == created["id"] and revoked["revoked_at"] is not None
    assert "invalid_credential" in run_cli(bot_env, "job", "list", code=1)
    admin_id = listed["items"][0]["id"]
    assert "last_admin_token" in run_cli(admin_env, "token", "revoke", str(admin_id), code=1)
    assert "api_token_not_found" in run_cli(admin_env, "token", "revoke", "9999", code=1)
    after = run_cli(admin_env, "token", "list", "--json")["items"]
    assert [t["revoked_at"] is None for t in after] == [True, False]
    table = CliRunner().invoke(app, ["token", "list"], env=admin_env).stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "ROLE", "CREATED", "LAST_USED", "REVOKED"]
    assert [row.split()[1:3] for row in table[2:4]] == [["bootstrap-admin", "admin"], ["ci-bot", "viewer"]]
    assert table[2].endswith("active") and not table[3].endswith("active") and table[-1] == "2 tokens"
    assert created["token"] not in "\n".join(table)
    assert after[0]["last_used_at"] is not None


def test_db_upgrade_and_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    up = runner.invoke(app, ["db", "upgrade", "--database-url", url])
    assert up.exit_code == 0, up.output
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    assert "jobs" in sa.inspect(engine).get_table_names()
    down = runner.invoke(app, ["db", "downgrade", "base", "--database-url", url])
    assert down.exit_code == 0, down.output
    assert sa.inspect(engine).get_table_names() == ["alembic_version"]
