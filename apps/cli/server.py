"""`flglm serve` (the control plane under uvicorn, optionally self-signed TLS) and `flglm db` (migrations)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from backend.settings import Settings

serve_app = typer.Typer(help="Run the control plane (FastAPI under uvicorn).", no_args_is_help=False)
db_app = typer.Typer(help="Database migrations of the job store.", no_args_is_help=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="where the SQLite file, keys and certificates live (FLGLM_DATA_DIR)"),
]


def _settings(data_dir: Path | None, database_url: str | None = None, **more: str | None) -> Settings:
    from backend.settings import Settings

    overrides: dict[str, object] = {name: value for name, value in more.items() if value}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if database_url:
        overrides["database_url"] = database_url
    return Settings(**overrides)  # type: ignore[arg-type]


@serve_app.callback(invoke_without_command=True)
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8443,
    ssl_certfile: Annotated[Path | None, typer.Option(help="PEM server certificate (chain)")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="PEM private key of the certificate")] = None,
    self_signed: Annotated[
        bool, typer.Option("--self-signed", help="make a local CA + server certificate in <data-dir>/tls")
    ] = False,
    data_dir: DataDir = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (FLGLM_DATABASE_URL)")] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            help="inprocess (an embedded worker) or celery (`flglm worker` processes over Redis); "
            "FLGLM_EXECUTOR"
        ),
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis of the Celery executor (FLGLM_REDIS_URL)")
    ] = None,
) -> None:
    """Serve `/api/v1` (and the dashboard at `/`) until Ctrl-C; migrations run at start."""
    import uvicorn

    from apps.cli.banner import serve_banner
    from apps.server import create_server_app
    from backend.tls import ensure_self_signed
    from flglm.process_memory import return_large_blocks_to_the_os

    if executor not in (None, "inprocess", "celery"):
        raise typer.BadParameter("must be inprocess or celery", param_hint="--executor")
    settings = _settings(data_dir, database_url, executor=executor, redis_url=redis_url)
    return_large_blocks_to_the_os()  # the embedded executor's step graphs, freed, leave at once
    certfile = ssl_certfile or settings.ssl_certfile
    keyfile = ssl_keyfile or settings.ssl_keyfile
    if self_signed:
        if certfile or keyfile:
            raise typer.BadParameter("--self-signed and --ssl-certfile/--ssl-keyfile exclude each other")
        files = ensure_self_signed(settings.data_dir / "tls")
        certfile, keyfile = files.server_cert, files.server_key
        typer.echo(f"flglm: self-signed TLS; agents and the CLI pass --ca-cert {files.ca_cert}", err=True)
    if (certfile is None) != (keyfile is None):
        raise typer.BadParameter("give both --ssl-certfile and --ssl-keyfile")
    if certfile is None:
        typer.echo(
            "flglm: WARNING serving plain HTTP; use --self-signed or a certificate outside tests", err=True
        )
    scheme = "https" if certfile else "http"
    typer.echo(serve_banner(settings, f"{scheme}://{host}:{port}"), err=True)
    app = create_server_app(settings)
    proxies = trusted_proxies(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        log_level="info",
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or "",
    )


def trusted_proxies(settings: Settings) -> list[str]:
    """Whose X-Forwarded-* uvicorn believes: `FLGLM_TRUSTED_PROXIES` only (uvicorn's own default trusts
    127.0.0.1, so anyone on the host could pick their address and dodge the rate limit)."""
    return [entry.strip() for entry in settings.trusted_proxies.split(",") if entry.strip()]


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
    data_dir: DataDir = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (FLGLM_DATABASE_URL)")] = None,
) -> None:
    """Migrate the job store up to REVISION (default: head)."""
    from backend.migrate import upgrade

    settings = _settings(data_dir, database_url)
    upgrade(settings.resolved_database_url(), revision)
    typer.echo(f"upgraded to {revision}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="target revision, e.g. -1 or base")],
    data_dir: DataDir = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (FLGLM_DATABASE_URL)")] = None,
) -> None:
    """Migrate the job store down to REVISION (`base` drops every table)."""
    from backend.migrate import downgrade

    settings = _settings(data_dir, database_url)
    downgrade(settings.resolved_database_url(), revision)
    typer.echo(f"downgraded to {revision}")
