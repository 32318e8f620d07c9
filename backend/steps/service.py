"""Step use cases: admit and store an upload, queue its task, long-poll its result, round-end client FedAvg.

Idempotency: an upload whose address already holds the same bytes is a no-op (200, its task queued again
only when no result exists yet: tasks are idempotent), different bytes at that address are a 409, and a
hostile upload is refused by the `flglm.admit_upload` task before anything is stored under its address.
The checks against the job database (approved participant of the current round of a running job) run
first, in `check_step_access`; everything after them touches only the blob store and the tasks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from backend.clients.repository import ClientRepository
from backend.errors import BadRequest, DomainError, InvalidInput, Unavailable, refusal
from backend.jobs.repository import JobRepository, RoundRepository
from backend.jobs.service import (
    JobNotRunning,
    NotRoundParticipant,
    StaleRound,
    ensure_server_key_available,
    job_for_client,
)
from backend.models import Job
from backend.server_keys import job_key_path
from backend.settings import Settings
from backend.steps.relay import StepRelay
from flglm.contracts import job_spec
from flglm.contracts.artifacts import client_adapters_path
from flglm.contracts.blob_store import PutOutcome
from flglm.contracts.dispatch import TaskHandle
from flglm.contracts.job_settings import AdapterSpec, Hyperparameters
from flglm.contracts.refusals import (
    ConflictingDuplicate,
    ReplayedMessage,
    StepRejected,
    UnknownJob,
    UploadNotFound,
)
from flglm.contracts.tasks import (
    ADMISSION_QUEUE,
    ADMIT_UPLOAD,
    CLIENT_FEDAVG,
    DROP_CLIENT,
    RELEASE_JOB,
    ROUND_END,
    route_step_message,
)
from flglm.protocol import JobStatus, RoundParticipantStatus
from flglm.step_protocol import (
    DEFAULT_QUEUE,
    EVAL_ROUND_RULE,
    JobClient,
    MessageDirection,
    MessageRef,
    UploadOutcome,
    WorkerJobSpec,
    client_adapters_ref,
    replica_queue,
    spec_blob_key,
)

log = logging.getLogger(__name__)

STEP_DIRECTIONS = (
    MessageDirection.activations,
    MessageDirection.gradients,
    MessageDirection.eval_activations,
)
STAGING_TTL_S = 600.0
# How long one backend's claim to republish a round's lost FedAvg results holds off the others' (the task is
# queued again after it, should it be lost too).
REPUBLISH_CLAIM_TTL_S = 30.0


class WorkerSpecInvalid(InvalidInput):
    code = "worker_spec_invalid"


class JobNotServed(Unavailable):
    """A running job whose worker spec is not in the blob store: Redis lost it (restarted without
    persistence); the housekeeping pass republishes it from the database, so the agent retries."""

    code = "job_not_published"


class AdmissionTimeout(Unavailable):
    code = "admission_timeout"


# ---- job start ------------------------------------------------------------------------------------


def worker_job_spec(session: Session, job: Job, settings: Settings) -> WorkerJobSpec:
    """The job as the workers see it: its first round's participants with their keys. Built from committed
    rows only, so it is the same whenever it is built: at the start, or again by housekeeping."""
    clients = ClientRepository(session)
    rounds = RoundRepository(session)
    first_round = rounds.get(job.id, 1)
    if first_round is None:
        raise WorkerSpecInvalid(f"job {job.id} has no first round: it never started")
    job_clients = []
    for client_id in sorted(p.client_id for p in rounds.participants(first_round.id)):
        client = clients.get(client_id)
        assert client is not None and client.public_key is not None  # enrolled, hence keyed
        job_clients.append(JobClient(client_id=client.id, public_key=client.public_key))
    try:
        return _build_spec(job, job_clients, settings, Hyperparameters.model_validate(job.hyperparameters))
    except ValidationError as exc:
        raise WorkerSpecInvalid(f"job {job.id} cannot be served by the workers: {exc}") from None


def _build_spec(
    job: Job, job_clients: list[JobClient], settings: Settings, hyper: Hyperparameters
) -> WorkerJobSpec:
    return WorkerJobSpec(
        job_id=job.id,
        model_ref=job.model_ref,
        split_plan=job.split_plan,  # type: ignore[arg-type]
        adapter=AdapterSpec.model_validate(job.adapter),
        hyperparameters=hyper,
        parallel_mode=job.parallel_mode,  # type: ignore[arg-type]
        replicas=job.replicas,
        clients=job_clients,
        wire_dtype=job.privacy.get("wire_dtype", "float32"),
        # Jobs opened before per-job keys (no public key in the row) stay on the deployment key.
        server_key_file=(
            str(job_key_path(settings.job_keys_dir(), job.id)) if job.server_public_key is not None else None
        ),
        checkpoint_dir=str(settings.resolved_checkpoint_dir() / f"job-{job.id}"),
        **hyper.engine_settings()
        # the workers refuse longer sequences: room for what a generation job's round evaluation generates
        | {"max_seq_len": hyper.max_seq_len + hyper.eval_max_new_tokens},
    )


def publish_job_spec(relay: StepRelay, spec: WorkerJobSpec) -> None:
    """Tell the workers a job started (write-once: another spec for the job is a 409 `spec_conflict`)."""
    try:
        job_spec.publish_job_spec(relay.store, spec)
    except StepRejected as exc:
        raise refusal(exc) from None


def publish_after_start(relay: StepRelay, spec: WorkerJobSpec) -> bool:
    """Publish a started job's spec once its start is committed; False when the blob store failed (logged:
    the housekeeping pass publishes it, `publish_missing_specs`), so the operator's start still answers."""
    try:
        publish_job_spec(relay, spec)
    except DomainError:
        raise
    except Exception:  # Redis down: the start is committed, the next housekeeping pass tells the workers
        log.exception("job %s started but its worker spec could not be published yet", spec.job_id)
        return False
    return True


def publish_missing_specs(session: Session, relay: StepRelay, settings: Settings) -> list[int]:
    """Publish the spec of every running or paused job that has none (its start committed, its publication
    lost); returns their ids."""
    published = []
    for job in JobRepository(session).with_status([JobStatus.running, JobStatus.paused]):
        if relay.store.get(spec_blob_key(job.id)) is None:
            publish_job_spec(relay, worker_job_spec(session, job, settings))
            published.append(job.id)
    return published


def read_spec(relay: StepRelay, job_id: int) -> WorkerJobSpec:
    try:
        return job_spec.read_job_spec(relay.store, job_id)
    except UnknownJob:
        raise JobNotServed(
            f"job {job_id} has no worker spec in the blob store (lost in a Redis restart?); the control "
            "plane republishes it from the database within seconds: retry",
            headers={"Retry-After": "2"},
        ) from None


def release_job_replicas(relay: StepRelay, job_ids: list[int]) -> None:
    """Jobs ended (committed): queue `flglm.release_job` on each of their replica queues, so every worker
    drops its replica from memory. Each queue runs its tasks in order, one at a time, so the release runs
    after the round-end checkpoint queued before it (`start_fedavg_when_complete`). A job that never
    started has no spec and nothing loaded."""
    for job_id in job_ids:
        try:
            spec = read_spec(relay, job_id)
        except JobNotServed:
            continue
        for replica in range(spec.replicas):
            kwargs = {"job_id": job_id, "replica": replica}
            relay.dispatcher.submit(RELEASE_JOB, kwargs, replica_queue(replica))


def release_dropped_clients(relay: StepRelay, drops: list[tuple[int, int]]) -> None:
    """Clients dropped from their rounds (committed): queue `flglm.drop_client` on each replica queue of
    their jobs, so a replica waiting for a dropped client's gradients finishes the others' step now."""
    for job_id, client_id in drops:
        try:
            spec = read_spec(relay, job_id)
        except JobNotServed:
            continue
        for replica in range(spec.replicas):
            kwargs = {"job_id": job_id, "replica": replica, "client_id": client_id}
            relay.dispatcher.submit(DROP_CLIENT, kwargs, replica_queue(replica))


# ---- access --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepAccess:
    """What the database said about a client's request; the blob-store part runs without a session."""

    job_id: int
    round_number: int
    client_id: int
    round_clients: tuple[int, ...]  # participants of the round not dropped (adapters routes only; else ())
    job_running: bool = True  # False once the job ended (its worker spec is no longer republished)


def check_step_access(
    session: Session,
    client_id: int,
    job_id: int,
    round_number: int,
    *,
    uploading: bool,
    after_close: str | None = None,
    with_round_clients: bool = False,
) -> StepAccess:
    """404 unless the client approved the job; uploads need the job running and this its current round.

    Uploads that may come after their round closed (`after_close` names them: eval forwards, adapters sent
    again) follow `EVAL_ROUND_RULE` instead: an agent evaluates round r's FedAvg'd model after round r
    closed, when round r + 1 may be open or the job may have just completed; and it uploads round r's
    adapters again when the blob store lost them (a Redis restart) after every participant reported the
    round done. Once the job's server key was deleted (retention after its end), every upload is a 410
    `job_key_deleted`.
    """
    job = job_for_client(session, job_id, client_id, approved=True)
    if uploading:
        ensure_server_key_available(job)
    if uploading and after_close is not None:
        if job.status not in (JobStatus.running, JobStatus.completed):
            raise JobNotRunning(f"job {job_id} is {job.status}; {after_close} need it running or completed")
        if round_number not in (job.current_round, job.current_round - 1):
            raise StaleRound(
                f"{after_close} of job {job_id} may name {EVAL_ROUND_RULE} ({job.current_round}), "
                f"not round {round_number}"
            )
    elif uploading and job.status != JobStatus.running:
        raise JobNotRunning(f"job {job_id} is {job.status}; step messages are accepted while it runs")
    if not uploading and job.status not in (JobStatus.running, JobStatus.completed):
        raise JobNotRunning(f"job {job_id} is {job.status}")
    if uploading and after_close is None and round_number != job.current_round:
        raise StaleRound(
            f"round {round_number} of job {job_id} is not its current round ({job.current_round})"
        )
    rounds = RoundRepository(session)
    round_ = rounds.get(job_id, round_number)
    if round_ is None or round_number > job.current_round:
        raise StaleRound(f"job {job_id} has no round {round_number} yet")
    mine = rounds.participant(round_.id, client_id)
    if mine is None:
        raise NotRoundParticipant(
            f"client {client_id} is not a participant of round {round_number} of job {job_id}"
        )
    if uploading and mine.status == RoundParticipantStatus.dropped:
        raise StaleRound(f"client {client_id} was dropped from round {round_number}: {mine.drop_reason}")
    running = job.status == JobStatus.running
    if not with_round_clients:  # steps: one row, not the round's N (every step request asked for them)
        return StepAccess(job_id, round_number, client_id, (), running)
    participants = rounds.participants(round_.id)
    active = tuple(p.client_id for p in participants if p.status != RoundParticipantStatus.dropped)
    return StepAccess(job_id, round_number, client_id, active, running)


# ---- uploads (run in the step wait pool: they block on the blob store and the admission task) ----------


def store_upload(relay: StepRelay, ref: MessageRef, body: bytes, admission_timeout_s: float) -> UploadOutcome:
    """Admit `body` for `ref`, store it write-once and queue its server task; idempotent (see module doc)."""
    if not body:
        raise BadRequest("the upload body is empty; send the sealed envelope as application/octet-stream")
    spec = read_spec(relay, ref.job_id)
    key = ref.blob_key()
    existing = relay.store.get(key)
    if existing is not None:
        return _duplicate(relay, spec, ref, existing, body)
    staging_key = f"staging:{key}:{uuid.uuid4().hex}"
    relay.store.put_if_absent(staging_key, body, STAGING_TTL_S)
    try:
        handle = relay.dispatcher.submit(
            ADMIT_UPLOAD,
            {"job_id": ref.job_id, "message": ref.model_dump(mode="json"), "staging_key": staging_key},
            ADMISSION_QUEUE,
        )
        handle.get(admission_timeout_s)
    except ReplayedMessage as exc:
        concurrent = relay.store.get(key)  # the same message admitted by a concurrent request
        if concurrent is not None:
            return _duplicate(relay, spec, ref, concurrent, body)
        raise refusal(exc) from None
    except StepRejected as exc:
        raise refusal(exc) from None
    except TimeoutError:
        raise AdmissionTimeout(
            f"no worker checked the upload within {admission_timeout_s} s; retry it"
        ) from None
    finally:
        relay.store.delete(staging_key)
    outcome = relay.store.put_if_absent(key, body, spec.blob_ttl_s)
    if outcome is PutOutcome.conflict:
        raise refusal(ConflictingDuplicate(f"{key} already holds a different message"))
    _queue_server_task(relay, spec, ref)
    return UploadOutcome.stored if outcome is PutOutcome.stored else UploadOutcome.identical


def _duplicate(
    relay: StepRelay, spec: WorkerJobSpec, ref: MessageRef, existing: bytes, body: bytes
) -> UploadOutcome:
    if existing != body:
        raise refusal(
            ConflictingDuplicate(
                f"message {ref.blob_key()} was already uploaded with different bytes; a retried step needs "
                "a new sequence number"
            )
        )
    result_key = ref.result_ref().blob_key()
    if relay.handle_for(result_key) is None and relay.store.get(result_key) is None:
        _queue_server_task(relay, spec, ref)  # the first request may have died before queueing it
    return UploadOutcome.identical


def _queue_server_task(relay: StepRelay, spec: WorkerJobSpec, ref: MessageRef) -> None:
    if ref.direction in STEP_DIRECTIONS:
        name, kwargs, queue = route_step_message(spec, ref)
        relay.remember(ref.result_ref().blob_key(), relay.dispatcher.submit(name, kwargs, queue))


def store_adapters(
    relay: StepRelay, access: StepAccess, body: bytes, example_count: int, admission_timeout_s: float
) -> UploadOutcome:
    """A client's round-end adapters (+ the example count FedAvg weighs them by); the last upload of the
    round's participants starts the FedAvg task."""
    ref = client_adapters_ref(access.job_id, access.round_number, access.client_id)
    outcome = store_upload(relay, ref, body, admission_timeout_s)
    if outcome is UploadOutcome.stored:
        # Stored anew although a FedAvg may have been queued for it: the blob store lost the round's uploads
        # and that task (a Redis restart), so the round's FedAvg must be queued again once all are back.
        relay.forget(ref.result_ref().blob_key())
    spec = read_spec(relay, access.job_id)
    relay.store.put_if_absent(_examples_key(ref), str(example_count).encode(), spec.blob_ttl_s)
    start_fedavg_when_complete(relay, access)
    return outcome


def _examples_key(ref: MessageRef) -> str:
    return f"examples:{ref.job_id}:{ref.round_number}:{ref.client_id}"


def start_fedavg_when_complete(relay: StepRelay, access: StepAccess) -> bool:
    """Queue the client FedAvg of a round once every participant still in it uploaded, and the round-end
    checkpoint of each server replica (idempotent tasks; queued once per backend process and round).

    True when the round's results are being published again from its saved average (`republish_lost_fedavg`):
    then the uploads are gone and need not come back."""
    refs = [client_adapters_ref(access.job_id, access.round_number, cid) for cid in access.round_clients]
    result_keys = [ref.result_ref().blob_key() for ref in refs]
    if republish_lost_fedavg(relay, access, refs):
        return True
    if all(relay.handle_for(key) is not None for key in result_keys):
        return False
    counts: dict[str, int] = {}
    for ref in refs:
        count = relay.store.get(_examples_key(ref))
        if count is None or relay.store.get(ref.blob_key()) is None:
            return False
        counts[str(ref.client_id)] = int(count)
    handle = relay.dispatcher.submit(
        CLIENT_FEDAVG,
        {
            "job_id": access.job_id,
            "round_number": access.round_number,
            "uploads": [ref.model_dump(mode="json") for ref in refs],
            "example_counts": counts,
        },
        DEFAULT_QUEUE,
    )
    for key in result_keys:
        relay.remember(key, handle)
    spec = read_spec(relay, access.job_id)
    for replica in range(spec.replicas):  # the round-end checkpoint of every server replica
        relay.dispatcher.submit(
            ROUND_END,
            {"job_id": access.job_id, "replica": replica, "round_number": access.round_number},
            replica_queue(replica),
        )
    return False


def republish_lost_fedavg(relay: StepRelay, access: StepAccess, refs: list[MessageRef]) -> bool:
    """Queue the FedAvg again when the blob store lost this client's result and some participant's upload
    after the round's average was saved (a Redis restart): the task publishes every participant's copy from
    that file, so a participant that already took its copy and moved on never has to send round r's adapters
    again (and one that sent them again does not wait for the others' forever).

    True when the results are coming (queued now or by a claim of the last `REPUBLISH_CLAIM_TTL_S`). While a
    running job's worker spec is being republished (lost with the rest), a 503 `job_not_published`: retry.
    """
    mine = client_adapters_ref(access.job_id, access.round_number, access.client_id)
    if relay.store.get(mine.result_ref().blob_key()) is not None:
        return False
    if all(relay.store.get(ref.blob_key()) is not None for ref in refs):
        return False  # the FedAvg runs (or ran) from the uploads
    try:
        spec = read_spec(relay, access.job_id)
    except JobNotServed:
        if access.job_running:
            raise
        return False  # an ended job's spec is gone for good: the lost upload is reported as before
    if not client_adapters_path(spec.checkpoint_dir, access.round_number).is_file():
        return False
    claim = f"republish:{access.job_id}:{access.round_number}"
    if relay.store.put_if_absent(claim, b"1", REPUBLISH_CLAIM_TTL_S) is PutOutcome.stored:
        log.warning(
            "job %d: the blob store lost round %d's FedAvg results; republishing them from the saved average",
            access.job_id,
            access.round_number,
        )
        kwargs = {
            "job_id": access.job_id,
            "round_number": access.round_number,
            "uploads": [ref.model_dump(mode="json") for ref in refs],
            "example_counts": {},
        }
        handle = relay.dispatcher.submit(CLIENT_FEDAVG, kwargs, DEFAULT_QUEUE)
        for ref in refs:
            relay.remember(ref.result_ref().blob_key(), handle)
    return True


# ---- long-polls ----------------------------------------------------------------------------------


def _verdict(handle: TaskHandle, wait_s: float) -> None:
    """Block until the task is done (raising its refusal) or `wait_s` passed (then return quietly)."""
    try:
        handle.get(wait_s)
    except TimeoutError:
        return


async def wait_for_result(
    relay: StepRelay, ref: MessageRef, wait_s: float, upload_needed: bool = True
) -> bytes | None:
    """The sealed result of the upload at `ref`, the moment it exists; None after `wait_s`.

    Waits on the blob and, when this process queued the task, on the task too: a refused task (a backward
    whose graph is gone, say) answers at once instead of after the whole wait. Without the upload (lost with
    the blob store) it is a 404 `upload_not_found`, unless `upload_needed` is False (a republished FedAvg).
    """
    loop = asyncio.get_running_loop()
    if upload_needed and await loop.run_in_executor(relay.wait_pool, relay.store.get, ref.blob_key()) is None:
        lost = UploadNotFound(f"nothing was uploaded at {ref.blob_key()} (or it expired, or was lost)")
        raise refusal(lost)
    result_key = ref.result_ref().blob_key()
    blob_wait = loop.run_in_executor(relay.wait_pool, relay.store.wait_for, result_key, wait_s)
    handle = relay.handle_for(result_key)
    if handle is None:
        return await blob_wait
    task_wait = loop.run_in_executor(relay.wait_pool, _verdict, handle, wait_s)
    waits: set[asyncio.Future[Any]] = {blob_wait, task_wait}
    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if blob_wait in done and blob_wait.result() is not None:
        return blob_wait.result()
    if task_wait in done:
        error = task_wait.exception()
        if isinstance(error, StepRejected):
            if relay.store.get(result_key) is None:  # a refused repeat of a task that already answered
                raise refusal(error)
        elif error is not None:
            raise error
    return await blob_wait
