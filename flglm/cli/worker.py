"""`flglm worker`: a Celery worker that serves server replicas (and the stateless default queue).

One process per replica slot: `--replica 0` consumes `flglm.replica.0`, where every job's replica 0 sends
its forward and backward tasks. The pool is `solo` (or one thread) on purpose: the autograd graph of a
forward stays in this process's memory until its backward arrives on the same queue, which prefork
children would not share.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flglm.step_protocol import DEFAULT_QUEUE, replica_queue

app = typer.Typer(help="Run a Celery worker serving server replicas.", no_args_is_help=False)


@app.callback(invoke_without_command=True)
def run(
    replica: Annotated[list[int], typer.Option("--replica", "-r", help="replica slot(s) to serve")] = [0],  # noqa: B006
    default_queue: Annotated[
        bool, typer.Option(help="also consume the default queue (client FedAvg)")
    ] = True,
    pool: Annotated[str, typer.Option(help="solo or threads (one thread); never prefork")] = "solo",
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info",
    hostname: Annotated[
        str | None, typer.Option(help="Celery node name (default flglm-r<replicas>@%h)")
    ] = None,
) -> None:
    """Start the worker in the foreground (Ctrl-C stops it; a running step is lost and retried)."""
    if pool not in ("solo", "threads"):
        raise typer.BadParameter("pool must be 'solo' or 'threads': replica graphs live in one process")
    if any(r < 0 for r in replica):
        raise typer.BadParameter("replica slots are >= 0")
    queues = [replica_queue(r) for r in sorted(set(replica))] + ([DEFAULT_QUEUE] if default_queue else [])
    from worker.celery_app import app as celery_app

    name = hostname or f"flglm-r{'-'.join(str(r) for r in sorted(set(replica)))}@%h"
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            ",".join(queues),
            "-P",
            pool,
            "-c",
            "1",
            "-n",
            name,
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )
