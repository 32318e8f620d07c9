"""`flglm agent run`: the long-running loop of a data owner's agent (client side).

Order of things, so that bad data never causes a send and a crash never loses more than one step:
1. read and validate the data file (no network yet: a bad file exits 2 having sent nothing);
2. a heartbeat thread (the example count only with `--share-example-count`);
3. poll `/agent/work`; act only on assignments for jobs approved through this agent (`approved.json`),
   whatever the server says;
4. per job: read its privacy settings (a setting this agent does not apply refuses the job, nothing sent),
   load only the client parts (front + back) and the tokenizer, re-validate the data against the job (task,
   label set), tokenise, split train/eval locally; build the defences (`flglm.privacy.client`: the clip's
   reference norm on the public input block; a private input block from this owner's persisted seed);
5. per step `run_client_step`, a checkpoint (adapters, optimizer, position) and a step metric (loss,
   token count, wire bytes: numbers only);
6. at the end of a round: adapters up (sealed; only the output block's with a private input block), round
   done (the round's mean training loss, the example count only if allowed), FedAvg'd adapters down, local
   evaluation of that global model, a second round-done report that adds the eval metrics, checkpoint at the
   start of the next round.

Data preparation lives in `client_agent.job_data`, the trainer and its checkpoint in
`client_agent.job_trainer`, local evaluation after each round's FedAvg in `client_agent.evaluation`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from client_agent.api import AgentFailure, ControlPlaneClient, ExitCode, failure_from
from client_agent.evaluation import RoundEvaluation
from client_agent.job_data import prepare_job_data, validate_data_file
from client_agent.job_trainer import build_trainer, restore_trainer, save_trainer
from client_agent.job_watch import TERMINAL_JOB_STATUSES, JobWatch, report_fatal
from client_agent.memory_log import MemoryLog
from client_agent.privacy import job_privacy
from client_agent.progress import RoundProgress, show_round_eval
from client_agent.state import (
    Enrollment,
    JobCheckpoint,
    RoundPosition,
    approved_jobs,
    load_enrollment,
    private_key_path,
)
from flglm import protocol
from flglm.agent_step import (
    ClientChannel,
    download_round_adapters,
    run_client_step,
    upload_round_adapters,
)
from flglm.contracts.job_settings import Hyperparameters
from flglm.contracts.refusals import ConflictingDuplicate
from flglm.data.batches import batch_at
from flglm.data.files import DataError
from flglm.data.tokens import collate
from flglm.step_client import (
    UPLOAD_NOT_FOUND,
    StepCertificateError,
    StepConflict,
    StepHttpError,
    StepNotFound,
    StepServerUnavailable,
    StepUnauthorized,
)
from flglm.wire.codec import parse_wire_dtype
from flglm.wire.keys import ClientKeyPair, derive_channel_keys, public_key_from_b64
from flglm.wire.sequence import SequenceCounter

log = logging.getLogger("flglm.agent")


@dataclass
class RunOptions:
    data_path: Path
    share_example_count: bool = False  # opt-in: the count is the only fact about the data ever sent
    quiet: bool = False
    stop_when_done: bool = False  # exit 0 once every approved job is over and nothing is left to decide
    poll_s: float = protocol.AGENT_POLL_S
    # With no round to work on, the work request waits this long on the server for one (a long-poll that
    # answers as soon as one of this agent's jobs changes), so an idle agent asks about twice a minute.
    work_wait_s: float = protocol.AGENT_WORK_WAIT_S
    heartbeat_s: float = protocol.AGENT_HEARTBEAT_S
    result_timeout_s: float = 600.0
    # Ride out a server that is unreachable (connection errors, 5xx) for this long, resuming from the state
    # directory as a restart would; exit 5 after. The server drops an agent silent for its heartbeat lease.
    max_outage_s: float = 900.0
    memory_log: Path | None = None  # `--memory-log`: resident memory per phase, one JSON line per event


MAX_OUTAGE_PAUSE_S = 15.0  # between two tries during an outage (each try's requests retry ~16 s on their own)


def open_client(enrollment: Enrollment) -> ControlPlaneClient:
    return ControlPlaneClient(enrollment.server_url, enrollment.credential, enrollment.ca_cert)


class JobSession:
    """One approved job on this agent: its client parts, data, channel and checkpoint."""

    def __init__(
        self,
        client: ControlPlaneClient,
        enrollment: Enrollment,
        keypair: ClientKeyPair,
        sequence: SequenceCounter,
        state_dir: Path,
        job: protocol.AgentJobView,
        options: RunOptions,
        memory: MemoryLog,
    ) -> None:
        self.job, self.options, self.client, self.memory = job, options, client, memory
        self.privacy = job_privacy(job.job_id, job.privacy)  # before anything else: refuse, sending nothing
        hp = Hyperparameters.model_validate(job.hyperparameters)
        self.seed = hp.seed
        self.batch_size = hp.batch_size
        # Data first: a file that does not fit the job (unknown label, wrong task) stops here, unsent.
        data = prepare_job_data(options.data_path, job)
        self.data = data
        self.train, self.pad_token_id = data.train, data.pad_token_id
        self.evaluation = RoundEvaluation(
            job.job_id, job.task_type.value, data, hp.batch_size, hp.eval_examples, hp.eval_max_new_tokens
        )
        self.example_count = len(data.train) if options.share_example_count else None

        self.checkpoint = JobCheckpoint(state_dir, job.job_id)
        self.trainer = build_trainer(job, hp, self.privacy, self.checkpoint)
        self.position = self.checkpoint.position() or RoundPosition()
        if self.checkpoint.position() is not None:
            restore_trainer(self.trainer, self.checkpoint)
            log.info(
                "job %d: resumed at round %d step %d (%s)",
                job.job_id,
                self.position.round_number,
                self.position.next_step,
                self.position.phase,
            )
        keys = derive_channel_keys(
            keypair.private_key,
            public_key_from_b64(job.server_public_key),
            str(job.job_id),
            str(enrollment.client_id),
        )
        wire_dtype = parse_wire_dtype(self.privacy.wire_dtype) or torch.float32
        self.channel = ClientChannel(
            client,
            keys,
            job.job_id,
            enrollment.client_id,
            wire_dtype,
            sequence.next,
            options.result_timeout_s,
        )
        memory.event("loaded", job=job.job_id)

    # ---- checkpointing ------------------------------------------------------------------------------

    def _save(self) -> None:
        save_trainer(self.trainer, self.checkpoint, self.position)

    # ---- one round ------------------------------------------------------------------------------------

    def _batch(self, round_number: int, step: int, steps: int) -> dict[str, torch.Tensor]:
        """The batch of a global step, the same after a restart (seeded epochs; skip the ones before)."""
        rows = batch_at(self.train, self.batch_size, self.seed, (round_number - 1) * steps + step)
        return collate(rows, self.pad_token_id)

    def run_round(self, assignment: protocol.WorkAssignment) -> None:
        job_id, round_number = self.job.job_id, assignment.round_number
        self._resend_unsent_metric()
        if self.position.round_number > round_number:
            return  # this round is done here; the server still waits for peers
        if self.position.round_number < round_number:
            # Dropped from earlier rounds (e.g. offline too long): start from the latest global adapters.
            download_round_adapters(
                self.trainer, self.channel, round_number - 1, self.options.result_timeout_s
            )
            self.position = RoundPosition(round_number)
            self._save()
        losses: list[float] = []
        if self.position.phase == "steps":
            progress = RoundProgress(
                job_id,
                round_number,
                self.job.rounds,
                assignment.steps,
                self.position.next_step,
                self.options.quiet,
            )
            try:
                for step in range(self.position.next_step, assignment.steps):
                    losses.append(self._run_step(round_number, step, assignment.steps, progress))
            finally:
                progress.close()
            self._upload_adapters(round_number)
            self.position.phase = "uploaded"
            self.checkpoint.save_position(self.position)
        if self.position.phase == "uploaded":
            metrics = {"train_loss": sum(losses) / len(losses)} if losses else {}
            count = self.example_count if self.example_count is not None else 0
            self.client.round_done(
                job_id, round_number, protocol.RoundDoneRequest(example_count=count, eval_metrics=metrics)
            )
            self.position.phase = "done"
            self.checkpoint.save_position(self.position)
        averaged = self._download_averaged(round_number)
        self.checkpoint.save_global_adapters(round_number, averaged)
        self.memory.event("eval_start", job=job_id, round=round_number)
        eval_metrics = self.evaluate(round_number)
        self.memory.event("eval_end", job=job_id, round=round_number)
        if eval_metrics:
            count = self.example_count if self.example_count is not None else 0
            self.client.round_done(
                job_id,
                round_number,
                protocol.RoundDoneRequest(example_count=count, eval_metrics=eval_metrics),
            )
            show_round_eval(job_id, round_number, eval_metrics, self.options.quiet)
        self.position = RoundPosition(round_number + 1)
        self._save()
        log.info("job %d: round %d done, FedAvg'd client adapters loaded", job_id, round_number)

    def _download_averaged(self, round_number: int, max_attempts: int = 3) -> dict[str, torch.Tensor]:
        """The round's FedAvg'd adapters; when the server lost this client's upload (Redis restarted without
        persistence, so the FedAvg never ran) the adapters are uploaded again and the wait starts over."""
        for attempt in range(1, max_attempts + 1):
            try:
                return download_round_adapters(
                    self.trainer, self.channel, round_number, self.options.result_timeout_s
                )
            except StepNotFound as exc:
                if exc.code != UPLOAD_NOT_FOUND or attempt == max_attempts:
                    raise
                log.warning(
                    "job %d: the server lost round %d's adapters upload; uploading them again",
                    self.job.job_id,
                    round_number,
                )
                self._upload_adapters(round_number)
        raise AssertionError("unreachable")

    def evaluate(self, round_number: int) -> dict[str, float]:
        """Local eval metrics of this round's global client adapters; {} when off or refused."""
        return self.evaluation.metrics(self.trainer, self.channel, round_number)

    def _run_step(self, round_number: int, step: int, steps: int, progress: RoundProgress) -> float:
        batch = self._batch(round_number, step, steps)
        tokens = int(batch["attention_mask"].sum())
        up, down, started = self.client.bytes_up, self.client.bytes_down, time.monotonic()
        result = run_client_step(self.trainer, self.channel, round_number, step, batch)
        self.position.next_step = step + 1
        metric = protocol.StepMetricIn(
            round_number=round_number,
            step=step,
            loss=result.loss,
            tokens=tokens,
            phase_timings_s={"step": time.monotonic() - started},
            wire_bytes_up=self.client.bytes_up - up,
            wire_bytes_down=self.client.bytes_down - down,
        )
        # Outbox first, position second: a crash after the position was saved still reports this step.
        self.checkpoint.save_unsent_metric(metric.model_dump(mode="json"))
        self._save()
        self._post_metric(metric)
        progress.step_done(result.loss, tokens)
        global_step = (round_number - 1) * steps + step
        self.memory.event("step", job=self.job.job_id, round=round_number, step=step, global_step=global_step)
        return result.loss

    def _post_metric(self, metric: protocol.StepMetricIn) -> None:
        """Report a step metric, then drop it from the outbox (the server keeps the first of a repeat)."""
        self.client.step_metric(self.job.job_id, metric)
        self.checkpoint.clear_unsent_metric()

    def _resend_unsent_metric(self) -> None:
        """After a restart: the last step's metric, if the agent died before the server confirmed it."""
        pending = self.checkpoint.unsent_metric()
        if pending is None:
            return
        try:
            self._post_metric(protocol.StepMetricIn.model_validate(pending))
        except StepHttpError as exc:
            if exc.status in (401, 403):
                raise
            log.warning("job %d: dropping an unsent step metric the server refuses: %s", self.job.job_id, exc)
            self.checkpoint.clear_unsent_metric()

    def _upload_adapters(self, round_number: int) -> None:
        # FedAvg weighs by the example count; an owner who does not disclose it is weighted 1 (equal shares).
        weight = self.example_count if self.example_count is not None else 1
        try:
            upload_round_adapters(self.trainer, self.channel, round_number, weight)
        except StepConflict as exc:
            # Sealing uses a fresh nonce, so a re-upload after a crash differs from the stored bytes.
            if exc.code != ConflictingDuplicate.code:
                raise
            log.info(
                "job %d: round %d adapters were already uploaded before a restart",
                self.job.job_id,
                round_number,
            )


class Heartbeat:
    """Background heartbeats on their own connection; remembers the first fatal failure (e.g. revoked)."""

    def __init__(self, enrollment: Enrollment, example_count: int | None, interval_s: float) -> None:
        self.failure: AgentFailure | None = None
        self._stop = threading.Event()
        self._client = open_client(enrollment)
        self._example_count, self._interval_s = example_count, interval_s
        self._thread = threading.Thread(target=self._loop, name="flglm-agent-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._client.heartbeat(self._example_count)
            except StepUnauthorized as exc:
                self.failure = failure_from(exc)
                return
            except Exception as exc:  # a missed heartbeat is not fatal; the main loop sees real outages
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._client.close()


class Outage:
    """How long the server has been unreachable; pauses between tries until `max_s`, then gives up."""

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.started: float | None = None

    def wait_or_raise(self, exc: StepServerUnavailable) -> None:
        now = time.monotonic()
        self.started = now if self.started is None else self.started
        elapsed = now - self.started
        if elapsed >= self.max_s:
            raise StepServerUnavailable(
                f"unreachable for {elapsed:.0f} s (--max-outage {self.max_s:g}): {exc}"
            ) from exc
        pause = min(MAX_OUTAGE_PAUSE_S, self.max_s - elapsed)
        log.warning(
            "server unreachable for %.0f s (giving up after %g s): %s; trying again in %.0f s",
            elapsed,
            self.max_s,
            exc,
            pause,
        )
        time.sleep(pause)

    def over(self) -> None:
        if self.started is not None:
            log.info("server reachable again after %.0f s", time.monotonic() - self.started)
        self.started = None


def close_ended_sessions(
    sessions: dict[int, JobSession], invitations: list[protocol.InvitationView], memory: MemoryLog
) -> None:
    """Release the client parts, data and optimizer of every job that is over (an agent serving many jobs
    over its life holds only the live ones)."""
    ended = [i.job_id for i in invitations if i.job_status in TERMINAL_JOB_STATUSES and i.job_id in sessions]
    for job_id in ended:
        del sessions[job_id]
    if ended:
        gc.collect()  # the modules' reference cycles; the memory log should see them gone
        for job_id in ended:
            memory.event("job_closed", job=job_id)


def run_agent(state_dir: Path, options: RunOptions) -> ExitCode:
    """Run until stopped; raises AgentFailure.

    With `stop_when_done`: until the jobs this owner approved are over and no job waiting for clients awaits
    a decision; exit 0, or 8 (`failed`) only when an approved job that this run saw not yet ended (at its
    start or later) failed or was cancelled. Jobs already over when the run started never count, so an old
    cancelled job never makes a later run exit 8 (`client_agent.job_watch`). A job waiting for this owner's
    approval is named once, with the command that approves it. A job whose training fails here (its model
    cannot be loaded, the data does not fit it, ...) is reported to the server before the agent stops, so the
    job fails (or drops this client) with the reason instead of waiting for its round deadline."""
    enrollment = load_enrollment(state_dir)
    example_count = validate_data_file(options.data_path)  # DataError propagates before any network call
    log.info(
        "%s: %d valid examples; sharing the count: %s",
        options.data_path,
        example_count,
        "yes" if options.share_example_count else "no",
    )
    keypair = ClientKeyPair.load(private_key_path(state_dir))
    sequence = SequenceCounter(state_dir / "sequence")
    sessions: dict[int, JobSession] = {}
    memory = MemoryLog(options.memory_log)
    memory.event("started")
    skipped: set[int] = set()  # jobs the server offers but the owner did not approve here (warned once)
    with open_client(enrollment) as client:
        try:
            client.heartbeat(example_count if options.share_example_count else None)
            heartbeat = Heartbeat(
                enrollment, example_count if options.share_example_count else None, options.heartbeat_s
            )
            heartbeat.start()
            outage = Outage(options.max_outage_s)
            watch = JobWatch(options.quiet)
            try:
                while True:
                    if heartbeat.failure is not None:
                        raise heartbeat.failure
                    approved = approved_jobs(state_dir)
                    try:
                        invitations = watch.observe(client.invitations())  # before any work: live at start
                        close_ended_sessions(sessions, invitations, memory)
                        assignments = client.work(options.work_wait_s)
                        outage.over()
                        for assignment in assignments:
                            if assignment.job_id not in approved:
                                if assignment.job_id in skipped:
                                    continue
                                skipped.add(assignment.job_id)
                                log.warning(
                                    "job %d: not approved through this agent; not working on it",
                                    assignment.job_id,
                                )
                                continue
                            try:
                                session = sessions.get(assignment.job_id)
                                if session is None:
                                    session = JobSession(
                                        client,
                                        enrollment,
                                        keypair,
                                        sequence,
                                        state_dir,
                                        assignment.job,
                                        options,
                                        memory,
                                    )
                                    sessions[assignment.job_id] = session
                                session.run_round(assignment)
                            except (StepHttpError, StepServerUnavailable, StepCertificateError, AgentFailure):
                                raise  # the server's answer or this agent's own refusal: nothing to report
                            except Exception as exc:
                                report_fatal(client, assignment.job_id, exc)
                                raise
                        outcome = None
                        if options.stop_when_done:
                            latest = list(client.invitations())
                            close_ended_sessions(sessions, latest, memory)
                            outcome = watch.outcome(latest, approved)
                    except StepServerUnavailable as exc:
                        outage.wait_or_raise(exc)
                        sessions.clear()  # resume each job from the state directory, as a restart would
                        continue
                    if outcome is not None:
                        return outcome
                    time.sleep(options.poll_s)
            finally:
                heartbeat.stop()
        except DataError:
            raise
        except Exception as exc:
            raise failure_from(exc) from exc
