"""docker-compose.yml, .env.example and the Dockerfile checked against the code (static: no Docker here).

The Docker daemon is not on the test machines, so nothing is started; Debian's docker-compose 1.29 parses
and resolves the file (schema, interpolation, profiles) without one. Every `flglm`
command line is parsed by the real Typer/click command tree, every FLGLM_* variable must be a field of the
settings class of the service that reads it, and ports, volumes and paths must agree between services.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

# Typer 0.29 vendors its own click (typer._click): its command classes, not the click package's.
from typer._click.core import Command
from typer._click.exceptions import UsageError
from typer.core import TyperGroup as Group

from apps.cli.main import app as cli_app
from backend.settings import Settings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
BACKEND_SERVICES = {"backend"}
WORKER_PREFIX = "worker"


def load_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # merges `<<:`
    return document


def cli_root() -> Group:
    root = typer.main.get_command(cli_app)
    assert isinstance(root, Group)
    return root


def resolve_command(args: list[str]) -> tuple[Command, list[str]]:
    """The click command an argv (without `flglm`) reaches, and the arguments left for it."""
    command: Command = cli_root()
    rest = list(args)
    while isinstance(command, Group) and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def command_problems(service: str, argv: list[str]) -> list[str]:
    """Parse argv with the real CLI, without running it; the errors click would print, if any."""
    if argv[:1] != ["flglm"]:
        return []
    command, rest = resolve_command(argv[1:])
    try:
        context = command.make_context(f"flglm {service}", list(rest), resilient_parsing=False)
    except UsageError as exc:
        return [f"{service}: `{' '.join(argv)}`: {exc.format_message()}"]
    leftover = [*getattr(context, "_protected_args", []), *context.args]
    if isinstance(command, Group) and leftover:
        return [f"{service}: `{' '.join(argv)}`: unknown command {leftover[0]!r}"]
    return []


def settings_fields(service: str) -> set[str]:
    model = Settings if service in BACKEND_SERVICES else WorkerSettings
    return {f"FLGLM_{name.upper()}" for name in model.model_fields}


def env_problems(services: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in services.items():
        env = service.get("environment") or {}
        for variable in env:
            if variable.startswith("FLGLM_") and variable not in settings_fields(name):
                problems.append(f"{name}: {variable} is not a setting of the service's settings class")
    return problems


def option_value(argv: list[str], option: str) -> str | None:
    return argv[argv.index(option) + 1] if option in argv else None


def compose_problems(document: dict[str, Any]) -> list[str]:
    services: dict[str, Any] = document["services"]
    problems = env_problems(services)
    for name, service in services.items():
        if "command" in service and service.get("image", "").startswith("flglm"):
            problems += command_problems(name, service["command"])
    return problems


def serve_default_port() -> int:
    command, _ = resolve_command(["serve"])
    (port,) = [p for p in command.params if p.name == "port"]
    default = port.default
    assert isinstance(default, int)
    return default


def test_compose_commands_and_settings_match_the_code() -> None:
    document = load_compose()
    assert compose_problems(document) == []
    services = document["services"]
    assert {"postgres", "redis", "backend", "worker"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service or name == "agent", f"{name} has no healthcheck"


def test_a_wrong_option_or_variable_would_be_caught() -> None:
    document = copy.deepcopy(load_compose())
    document["services"]["worker"]["command"] = ["flglm", "worker", "--replicas", "0"]
    document["services"]["backend"]["command"] = ["flglm", "srv"]
    document["services"]["backend"]["environment"]["FLGLM_DATABASE"] = "x"
    document["services"]["worker"]["environment"]["FLGLM_CHECKPOINT_DIR"] = "/c"  # backend-only setting
    problems = "\n".join(compose_problems(document))
    assert "--replicas" in problems and "srv" in problems
    for bad in (["--replica", "all"], ["--replica", "auto", "--replica", "1"], ["--max-replicas", "0"]):
        assert command_problems("worker", ["flglm", "worker", *bad]) != [], bad
    assert "FLGLM_DATABASE " in problems and "worker: FLGLM_CHECKPOINT_DIR" in problems


def test_ports_volumes_and_paths_agree() -> None:
    services = load_compose()["services"]
    backend = services["backend"]
    port = option_value(backend["command"], "--port")
    assert port is not None and int(port) == serve_default_port()
    assert f"{port}:{port}" in backend["ports"]
    assert f"localhost:{port}/api/v1/health" in " ".join(backend["healthcheck"]["test"])
    env = backend["environment"]
    assert env["FLGLM_EXECUTOR"] == "celery" and env["FLGLM_RUN_MIGRATIONS_ON_START"] == "true"
    assert (
        env["FLGLM_DATABASE_URL"].startswith("postgresql+psycopg://")
        and "@postgres:5432/" in env["FLGLM_DATABASE_URL"]
    )
    volumes = {v.split(":")[0]: v.split(":")[1] for v in backend["volumes"]}
    assert volumes["checkpoints"] == env["FLGLM_CHECKPOINT_DIR"]
    workers = {n: s for n, s in services.items() if n.startswith(WORKER_PREFIX)}
    replicas = []
    for name, worker in workers.items():
        mounts = {v.split(":")[0]: v.split(":")[1] for v in worker["volumes"]}
        # Workers write checkpoints under the path the backend put in the job spec; the key the backend made.
        assert mounts["checkpoints"] == env["FLGLM_CHECKPOINT_DIR"], name
        key_file = worker["environment"]["FLGLM_SERVER_KEY_FILE"]
        assert (
            key_file == f"{mounts['flglm-data']}/server_x25519.key"
            and volumes["flglm-data"] == env["FLGLM_DATA_DIR"]
        )
        assert worker["environment"]["FLGLM_REDIS_URL"] == env["FLGLM_REDIS_URL"]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        replicas.append(option_value(worker["command"], "--replica"))
    fixed = [replica for replica in replicas if replica != "auto"]
    assert len(set(fixed)) == len(fixed), "two workers on one replica queue would split its graphs"
    declared = set(load_compose()["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            bind_mount = source.startswith((".", "/", "${"))
            assert bind_mount or source in declared, f"{name}: volume {source} undeclared"


def test_one_scalable_worker_service_leases_its_replica_slot() -> None:
    """`docker compose up --scale worker=N`: one worker service, every container a slot lease and all GPUs."""
    services = load_compose()["services"]
    assert [name for name in services if name.startswith(WORKER_PREFIX)] == [
        "worker"
    ]  # `queues` is not scaled
    worker = services["worker"]
    command = worker["command"]
    assert command[:2] == ["flglm", "worker"] and option_value(command, "--replica") == "auto"
    assert option_value(command, "--pool") == "solo"  # a replica's graphs live in one process
    assert int(option_value(command, "--max-replicas") or 0) >= 8
    assert "container_name" not in worker and "ports" not in worker  # both would make --scale fail
    (devices,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices["count"] == "all" and "device_ids" not in devices  # the worker picks slot % GPU count
    assert float(worker["environment"]["FLGLM_SLOT_LEASE_TTL_S"]) > 0
    assert "stop_grace_period" in worker  # time to finish the running step and release the lease
    header = (ROOT / "docker-compose.yml").read_text().split("services:")[0]
    assert "--scale worker=" in header and "flglm worker slots" in header


def test_upload_admission_runs_on_a_queue_worker_never_behind_a_forward() -> None:
    """A replica worker's solo pool runs one task at a time: an admission queued there would wait behind a
    forward pass. The replica workers consume their replica queue only; a `queues` worker the rest."""
    services = load_compose()["services"]
    replica_queues = services["worker"]["command"]
    for flag in ("--no-admission-queue", "--no-default-queue", "--no-privacy-queue"):
        assert flag in replica_queues, flag
    queues = services["queues"]["command"]
    assert (
        queues[:4] == ["flglm", "worker", "--replica", "none"] and option_value(queues, "--pool") == "threads"
    )
    assert not any(flag.startswith("--no-") for flag in queues)  # admission, FedAvg and audits all here
    assert "deploy" not in services["queues"]  # no GPU: it runs no replica
    assert command_problems("worker", ["flglm", "worker", "slots", "--json"]) == []


def test_env_example_names_real_settings() -> None:
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*(FLGLM_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert names and names <= settings_fields("backend"), names - settings_fields("backend")
    assert load_compose()["services"]["backend"]["env_file"] == [".env"]


def test_dockerfile_installs_pinned_torch_before_the_project() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert (
        lines[next(i for i, line in enumerate(lines) if line.startswith("FROM"))] == "FROM python:3.11-slim"
    )
    torch_line = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line and line.startswith("RUN"))
    project_line = next(i for i, line in enumerate(lines) if '".[server]"' in line)
    assert torch_line < project_line


def test_agent_service_is_optional_and_runs_the_agent() -> None:
    agent = load_compose()["services"]["agent"]
    assert agent["profiles"] == ["agent"] and agent["command"][:3] == ["flglm", "agent", "run"]
    assert command_problems("agent", ["flglm", "agent"]) != []  # a group alone is not a runnable command


def run_docker_compose(project: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """`docker-compose ARGS` (Debian's 1.29, installed by `make setup`; parses only, needs no daemon)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is required (Debian package docker-compose; `make setup` installs it)")
    clean_env = {
        k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD" and not k.startswith("COMPOSE_")
    }
    return subprocess.run(
        [binary, "--project-directory", str(project), "-f", str(project / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean_env, **(env or {})},
    )


def test_a_real_compose_implementation_parses_the_file(tmp_path: Path) -> None:
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())

    parsed = run_docker_compose(tmp_path, "--profile", "agent", "config")
    assert parsed.returncode == 0, parsed.stderr
    config = yaml.safe_load(parsed.stdout)
    assert set(config["services"]) == {"postgres", "redis", "backend", "worker", "queues", "agent"}
    worker = config["services"]["worker"]
    assert worker["command"][:4] == ["flglm", "worker", "--replica", "auto"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    backend = config["services"]["backend"]
    assert "change-me@postgres:5432/flglm" in backend["environment"]["FLGLM_DATABASE_URL"]  # from .env

    (tmp_path / ".env").write_text("FLGLM_BOOTSTRAP_ADMIN_TOKEN=\n")  # no POSTGRES_PASSWORD
    refused = run_docker_compose(tmp_path, "config", "-q")
    assert refused.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in refused.stderr
