"""Entry point of the `flglm` command: registers every verb group."""

import logging

import typer

from apps.cli import agent, artifacts, bench, demo, operator, privacy, server, worker

# HTTP clients log every request at INFO: an agent polling every 2 s would print a line a second.
for _client_logger in ("httpx", "httpcore"):
    logging.getLogger(_client_logger).setLevel(logging.WARNING)

app = typer.Typer(
    help="FL-GLM: split federated fine-tuning of LLMs on data that never leaves its owners.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(bench.app, name="bench")
app.add_typer(demo.app, name="demo")
app.add_typer(worker.app, name="worker")
app.add_typer(agent.app, name="agent")
app.add_typer(server.serve_app, name="serve")
app.add_typer(server.db_app, name="db")
app.add_typer(operator.job_app, name="job")
app.add_typer(operator.client_app, name="client")
app.add_typer(operator.token_app, name="token")
app.add_typer(privacy.app, name="privacy")
app.command("generate")(artifacts.generate)


if __name__ == "__main__":
    app()
