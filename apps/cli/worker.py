"""`flglm worker`: a Celery worker that serves server replicas (and the default and privacy-audit queues).

One process per replica slot: `--replica 0` consumes `flglm.replica.0`, where every job's replica 0 sends
its forward and backward tasks. The pool is `solo` (or one thread) on purpose: the autograd graph of a
forward stays in this process's memory until its backward arrives on the same queue, which prefork
children would not share. `--replica auto` (what `docker compose up --scale worker=N` runs) leases the
lowest free slot in Redis instead (worker.slots) and exits with status 3 if that lease is ever taken by
another worker, so that no two processes consume one replica queue. `flglm worker slots` lists the leases.

`--replica none` serves no replica: a queue worker for the stateless queues (upload admission, client
FedAvg, privacy audits), which may run several threads (`--pool threads --concurrency N`). In the production
topology it takes upload admission off the replica workers, where an admission would wait behind a forward.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Annotated

import typer

from flglm.step_protocol import DEFAULT_QUEUE, replica_queue

if TYPE_CHECKING:
    from worker.slots import SlotClaim

app = typer.Typer(help="Run a Celery worker serving server replicas.", no_args_is_help=False)

AUTO_REPLICA = "auto"
NO_REPLICA = "none"


def parse_replica_slots(values: list[str]) -> list[int] | None:
    """The fixed slots of `--replica K ...` ([] for `--replica none`), or None for `--replica auto`."""
    for word in (AUTO_REPLICA, NO_REPLICA):
        if word in values and len(values) > 1:
            raise typer.BadParameter(f"--replica {word} takes no other --replica", param_hint="--replica")
    if values == [NO_REPLICA]:
        return []
    if AUTO_REPLICA in values:
        return None
    try:
        slots = sorted({int(value) for value in values})
    except ValueError:
        raise typer.BadParameter(
            f"replica slots are numbers >= 0, 'auto' or 'none', not {values}", param_hint="--replica"
        ) from None
    if any(slot < 0 for slot in slots):
        raise typer.BadParameter("replica slots are >= 0", param_hint="--replica")
    return slots


def claim_free_slot(max_replicas: int) -> tuple[SlotClaim, int]:
    """Lease the lowest free slot (or fail with a message that says why) and keep it with a heartbeat."""
    import redis

    from worker.settings import get_worker_settings
    from worker.slots import LEASE_LOST_EXIT_CODE, NoFreeSlot, SlotClaim, default_identity

    settings = get_worker_settings()
    claim = SlotClaim(
        redis.Redis.from_url(settings.redis_url),
        settings.worker_identity or default_identity(),
        settings.slot_lease_ttl_s,
    )
    try:
        slot = claim.claim(max_replicas)
    except (NoFreeSlot, redis.RedisError) as exc:
        typer.echo(f"flglm worker: cannot claim a replica slot: {exc}", err=True)
        raise typer.Exit(1) from None

    def stop_consuming(reason: str) -> None:
        # Never share a queue: leave at once; the unacknowledged task is redelivered to the slot's owner.
        typer.echo(f"flglm worker: {reason}; exiting so that it is restarted on a free slot", err=True)
        os._exit(LEASE_LOST_EXIT_CODE)

    claim.start_heartbeat(stop_consuming)
    typer.echo(f"flglm worker: claimed replica slot {slot} as {claim.owner} ({claim.how})", err=True)
    return claim, slot


def check_replica_option(values: list[str]) -> list[str]:
    """Reject a bad --replica while parsing (so that a wrong compose command fails its static test too)."""
    parse_replica_slots(values)
    return values


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    replica: Annotated[
        list[str],
        typer.Option(
            "--replica",
            "-r",
            help="replica slot(s) to serve; 'auto': lease the lowest free slot in Redis; 'none': a queue "
            "worker (admission, FedAvg, privacy audits) that serves no replica",
            callback=check_replica_option,
        ),
    ] = ["0"],  # noqa: B006
    max_replicas: Annotated[
        int, typer.Option(min=1, help="with --replica auto: slots 0..N-1 may be claimed")
    ] = 64,
    default_queue: Annotated[
        bool, typer.Option(help="also consume the default queue (client FedAvg)")
    ] = True,
    admission_queue: Annotated[
        bool,
        typer.Option(
            help="also consume the upload-admission queue (flglm.admission): each task checks one upload in "
            "milliseconds, but on a replica worker it waits behind forwards: production runs it on a "
            "`--replica none` queue worker (some worker must, or uploads answer 503)"
        ),
    ] = True,
    privacy_queue: Annotated[
        bool,
        typer.Option(
            help="also consume the privacy-audit queue (flglm.privacy): an audit holds this process for its "
            "minutes, so its replica queue waits meanwhile; --no-privacy-queue on busy replicas"
        ),
    ] = True,
    pool: Annotated[str, typer.Option(help="solo or threads; never prefork")] = "solo",
    concurrency: Annotated[
        int, typer.Option(min=1, max=64, help="threads of a `--replica none --pool threads` queue worker")
    ] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info",
    hostname: Annotated[
        str | None, typer.Option(help="Celery node name (default flglm-r<replicas>@%h)")
    ] = None,
) -> None:
    """Start the worker in the foreground (Ctrl-C stops it; a running step is lost and retried)."""
    if ctx.invoked_subcommand is not None:
        return
    if pool not in ("solo", "threads"):
        raise typer.BadParameter("pool must be 'solo' or 'threads': replica graphs live in one process")
    slots = parse_replica_slots(replica)
    if concurrency > 1 and (slots != [] or pool != "threads"):
        raise typer.BadParameter(
            "--concurrency > 1 needs --replica none --pool threads: a replica's graphs live in one thread",
            param_hint="--concurrency",
        )
    claim = None
    if slots is None:
        claim, slot = claim_free_slot(max_replicas)
        slots = [slot]
    from flglm.contracts.tasks import ADMISSION_QUEUE, PRIVACY_QUEUE

    queues = [replica_queue(r) for r in slots] + ([DEFAULT_QUEUE] if default_queue else [])
    queues += [ADMISSION_QUEUE] if admission_queue else []
    queues += [PRIVACY_QUEUE] if privacy_queue else []
    if not queues:
        raise typer.BadParameter("this worker would consume no queue: serve a replica or keep a queue on")
    from flglm.process_memory import return_large_blocks_to_the_os

    return_large_blocks_to_the_os()  # a replica's freed step graphs leave at once, not kept in the heap
    from worker.celery_app import app as celery_app
    from worker.tasks import use_device_of_slot

    use_device_of_slot(slots[0] if slots else 0)
    from apps.cli.banner import worker_banner
    from worker.runtime import pick_device
    from worker.settings import get_worker_settings

    worker_settings = get_worker_settings()
    device = pick_device(slots[0] if slots else 0, worker_settings.worker_device)
    typer.echo(worker_banner(worker_settings, queues, str(device)), err=True)
    name = hostname or f"flglm-r{'-'.join(str(r) for r in slots) or 'none'}@%h"
    try:
        celery_app.worker_main(
            [
                "worker",
                "-Q",
                ",".join(queues),
                "-P",
                pool,
                "-c",
                str(concurrency),
                "-n",
                name,
                "--loglevel",
                loglevel,
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        if claim is not None:
            claim.release()


@app.command("slots")
def list_slots(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """List the replica slots leased by `--replica auto` workers: slot, owner, seconds until expiry."""
    import redis

    from worker.settings import get_worker_settings
    from worker.slots import read_slot_leases

    try:
        leases = read_slot_leases(redis.Redis.from_url(get_worker_settings().redis_url))
    except redis.RedisError as exc:
        typer.echo(f"flglm worker slots: cannot read the leases from Redis: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"slots": [dataclasses.asdict(lease) for lease in leases]}))
        return
    if not leases:
        typer.echo("no replica slot is leased (fixed --replica K workers hold no lease)")
        return
    typer.echo(f"{'slot':>4}  {'expires in':>10}  owner")
    for lease in leases:
        typer.echo(f"{lease.slot:>4}  {lease.ttl_s:>9.1f}s  {lease.owner}")
