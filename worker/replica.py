"""One server replica of one job: the body with its adapters and optimizer, the step in flight, the batching.

Why one step in flight at a time: an optimizer step updates the body's weights in place, which would
invalidate the saved tensors of any other graph built on the old weights. So a replica runs one forward
group (one client in `sequential`, the clients of one step in the batch modes), waits for its gradients,
applies them, and only then starts the next group; forwards that arrive meanwhile wait in `_arrivals`.

Exactly once: every applied optimizer step gets a journal entry (write-once, in the blob store) naming the
messages it used, *before* any result of that step is published. A restarted replica loads its newest
checkpoint and replays the journal entries after it from the stored messages, so a step is never lost
once an agent could have seen its result, and the `applied` set stops a retried step from being applied
again. Replay publishes each replayed step's dL/dh0 (recomputed on the same weights, so the same values) when
the crash came between the journal entry and the result: the agent waiting for it gets the result of the
step that was applied, instead of retrying the step's forward on weights that already contain it.

Evaluation forwards (`submit_eval_forward`) are not steps: they run the body at once, under
`torch.no_grad()` in eval mode with the current server adapters, publish h1 and keep nothing (no graph, no
journal entry, no counter, no optimizer state). They need no ordering with the training group: the replica
runs one task at a time (its lock and its single queue), an optimizer step only happens inside a training
task, and a no-grad forward leaves the in-flight graph's saved tensors alone. So an eval forward runs
between two training tasks as soon as its own task comes up on the replica's queue, never waits for a
training group's gradients or batch window, and delays the training step by at most its own forward.

This module keeps the public operations, the scheduling and the compute; the replica holds and calls
`worker.replica_mailbox` (addressing, channel keys, opening uploads, publishing sealed results),
`worker.replica_journal` (journal entries, checkpoints, what replay reads back) and `worker.replica_sync`
(hierarchical FedAvg between replicas).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from torch import nn

from flglm.contracts.blob_store import BlobStore
from flglm.contracts.refusals import (
    JournalGap,
    ReplayedMessage,
    ReplicaBusy,
    ReplicaMisrouted,
    StepGraphMissing,
    StepRejected,
)
from flglm.protocol import ParallelMode
from flglm.step_messages import PayloadLimits, open_activations, open_hidden
from flglm.step_protocol import MessageDirection, MessageRef, WorkerJobSpec
from flglm.trainers import ServerSideTrainer, TrainConfig
from flglm.wire.codec import parse_wire_dtype
from flglm.wire.sequence import ReplayGuard
from worker.replica_journal import ReplicaJournal, applied_key, journal_key, note_replayed_sequence
from worker.replica_mailbox import ReplicaMailbox
from worker.replica_sync import average_with_peers, sync_due

log = logging.getLogger(__name__)

CONSUMED_GRACE_S = 60.0  # how long a step message outlives the checkpoint that made it unnecessary
ScheduleFlush = Callable[[float], None]  # "call flush() on this replica in about this many seconds"


@dataclass
class Arrival:
    """An opened forward upload waiting to run."""

    ref: MessageRef
    hidden_states: torch.Tensor  # (batch, seq, hidden), compute dtype
    attention_mask: torch.Tensor  # (batch, seq)
    arrived_at: float


@dataclass
class InflightGroup:
    """One forward already run whose gradients are awaited; its graph lives in the trainer under `key`."""

    key: int
    members: list[Arrival]
    rows: list[tuple[int, int]]  # (first row, end row) of each member in the concatenated batch
    padded_seq: int
    created_at: float
    gradients: dict[int, tuple[MessageRef, torch.Tensor]] = field(
        default_factory=dict
    )  # client → (ref, grad)
    first_gradient_at: float | None = None
    abandoned: set[int] = field(default_factory=set)  # clients that retried the step from a new forward

    def member_of(self, client_id: int) -> Arrival | None:
        return next((m for m in self.members if m.ref.client_id == client_id), None)


class ServerReplica:
    """Serves the clients of one replica of one job; see the module docstring for the invariants."""

    def __init__(
        self,
        spec: WorkerJobSpec,
        replica: int,
        body: nn.Module,
        store: BlobStore,
        server_private_key: X25519PrivateKey,
        schedule_flush: ScheduleFlush,
        device: torch.device | None = None,
    ) -> None:
        if not 0 <= replica < spec.replicas:
            raise ReplicaMisrouted(f"job {spec.job_id} has {spec.replicas} replicas; no replica {replica}")
        self.spec, self.replica, self.store = spec, replica, store
        self.device = device or torch.device("cpu")
        self.trainer = ServerSideTrainer(body.to(self.device), self._train_config(spec), max_pending_graphs=2)
        self.clients = spec.replica_clients(replica)
        self._schedule_flush = schedule_flush
        wire_dtype = parse_wire_dtype(spec.wire_dtype)
        assert wire_dtype is not None
        self.wire_dtype = wire_dtype
        self.limits = PayloadLimits(wire_dtype, _hidden_size(body), spec.max_batch_size, spec.max_seq_len)
        self.mailbox = ReplicaMailbox(spec, replica, store, server_private_key, self.limits, wire_dtype)
        self.journal = ReplicaJournal(spec, replica, store)
        self.guard = ReplayGuard()
        self.server_steps = 0  # optimizer steps applied = journal entries written
        self.applied: set[str] = set()
        self._arrivals: list[Arrival] = []
        self._inflight: InflightGroup | None = None
        self._next_group_key = 0
        self._flush_due: float | None = None
        self._lock = threading.RLock()
        self._consumed: list[str] = []  # blob keys of finished steps not yet covered by a checkpoint
        self._journal_expired_upto = 0  # journal entries up to here were let expire
        self._restore()

    @staticmethod
    def _train_config(spec: WorkerJobSpec) -> TrainConfig:
        return spec.hyperparameters.train_config()

    # ---- public operations (each is one task) -------------------------------------------------------

    def submit_forward(self, ref: MessageRef) -> dict[str, Any]:
        """Accept an activations upload; runs its forward group now or when the group is complete."""
        with self._lock:
            self.mailbox.check_addressed(ref, MessageDirection.activations)
            if self.store.get(ref.result_ref().blob_key()) is not None:
                return {"status": "done"}  # a repeated task: the result is already published
            if any(a.ref == ref for a in self._arrivals) or (
                self._inflight is not None and any(m.ref == ref for m in self._inflight.members)
            ):
                return {"status": "pending"}
            if len(self._arrivals) >= self.spec.max_pending:
                raise ReplicaBusy(f"{len(self._arrivals)} forwards already wait on replica {self.replica}")
            blob = self.mailbox.upload(ref)
            hidden, mask = self.mailbox.open_forward(ref, blob, self.guard)
            # A newer attempt of the same step supersedes an older one still waiting (sequences grow).
            self._arrivals = [
                a
                for a in self._arrivals
                if not (a.ref.step_key() == ref.step_key() and a.ref.sequence < ref.sequence)
            ]
            self._arrivals.append(
                Arrival(ref, hidden.to(self.device), mask.to(self.device), time.monotonic())
            )
            self._abandon_older_attempt(ref)
            self._advance()
            return {"status": "done" if self.store.get(ref.result_ref().blob_key()) else "pending"}

    def submit_backward(self, ref: MessageRef) -> dict[str, Any]:
        """Accept a gradients upload for the step in flight; applies the group once all gradients are in."""
        with self._lock:
            self.mailbox.check_addressed(ref, MessageDirection.gradients)
            if self.store.get(ref.result_ref().blob_key()) is not None:
                return {"status": "done"}
            self._evict_stale()
            group = self._inflight
            member = None if group is None else group.member_of(ref.client_id)
            if group is None or member is None or member.ref.step_key() != ref.step_key():
                raise StepGraphMissing(
                    f"no forward of round {ref.round_number} step {ref.step} for client {ref.client_id} is "
                    f"in flight on replica {self.replica}; retry the step from its forward"
                )
            if ref.sequence <= member.ref.sequence:
                # Sequences grow per client: gradients older than the forward in flight answer an earlier
                # attempt of this step (a redelivered task), never this graph.
                raise StepGraphMissing(
                    f"gradients {ref.sequence} of client {ref.client_id} predate the forward in flight "
                    f"({member.ref.sequence}); they belong to an abandoned attempt"
                )
            if ref.client_id in group.gradients:
                if group.gradients[ref.client_id][0] == ref:
                    return {"status": "pending"}
                raise ReplayedMessage(f"client {ref.client_id} already sent the gradients of this step")
            blob = self.mailbox.upload(ref)
            expected_shape = tuple(member.hidden_states.shape)
            grad = self.mailbox.open_gradients(ref, blob, expected_shape, self.guard)
            group.gradients[ref.client_id] = (ref, grad.to(self.device))
            if group.first_gradient_at is None:
                group.first_gradient_at = time.monotonic()
            self._advance()
            return {"status": "done" if self.store.get(ref.result_ref().blob_key()) else "pending"}

    def submit_eval_forward(self, ref: MessageRef) -> dict[str, Any]:
        """Run an eval_activations upload through the body without a graph and publish its eval_result."""
        with self._lock:
            self.mailbox.check_addressed(ref, MessageDirection.eval_activations)
            if self.store.get(ref.result_ref().blob_key()) is not None:
                return {"status": "done"}  # a repeated task: the result is already published
            blob = self.mailbox.upload(ref)
            hidden, mask = self.mailbox.open_forward(ref, blob, self.guard)
            h1 = self._eval_body(hidden.to(self.device), mask.to(self.device))  # (batch, seq, hidden)
            self.mailbox.publish(ref.result_ref(), h1)
            return {"status": "done"}

    def _eval_body(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The body in eval mode (no adapter dropout), same dtype and autocast as training, no graph."""
        trainer = self.trainer
        body = trainer.body
        dtype = next((p.dtype for p in body.parameters() if p.is_floating_point()), torch.float32)
        body.eval()
        try:
            with (
                torch.no_grad(),
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=trainer.cfg.bf16_autocast),
            ):
                return body(hidden.to(dtype), mask)  # (batch, seq, hidden)
        finally:
            body.train()  # the trainer keeps the body in train mode between steps

    def _abandon_older_attempt(self, ref: MessageRef) -> None:
        """A newer forward from a client whose older forward is in flight without gradients means the agent
        gave up on that attempt (lost result, retry): stop waiting for it instead of until the timeout."""
        group = self._inflight
        member = None if group is None else group.member_of(ref.client_id)
        if group is None or member is None or member.ref.sequence >= ref.sequence:
            return
        self._stop_waiting_for(group, ref.client_id)

    def _stop_waiting_for(self, group: InflightGroup, client_id: int) -> bool:
        """Count the client's missing gradients as zero; a group nobody answers any more frees its graph.
        True when the client's gradients were still awaited."""
        awaited = client_id not in group.gradients
        if awaited:
            group.abandoned.add(client_id)
        if not group.gradients and group.abandoned == {m.ref.client_id for m in group.members}:
            self.trainer.drop(group.key)
            self._inflight = None
        return awaited

    def drop_client(self, client_id: int) -> dict[str, Any]:
        """The backend dropped this client from its round: forget its waiting forwards and stop waiting for
        its gradients, so the others' step goes on now instead of after `inflight_timeout_s`."""
        with self._lock:
            waiting = len(self._arrivals)
            self._arrivals = [a for a in self._arrivals if a.ref.client_id != client_id]
            forgotten = waiting - len(self._arrivals)
            group = self._inflight
            awaited = False
            if group is not None and group.member_of(client_id) is not None:
                awaited = self._stop_waiting_for(group, client_id)
            self._advance()
            log.info("replica %s: client %s dropped from its round", self.replica, client_id)
            return {
                "status": "dropped",
                "forwards_forgotten": forgotten,
                "gradients_awaited": awaited,
            }

    def flush(self) -> dict[str, Any]:
        """Timer task: run whatever batch or backward has waited past its window; evict stale graphs."""
        with self._lock:
            self._flush_due = None
            self._advance()
            return {"status": "flushed", "server_steps": self.server_steps}

    def end_round(self, round_number: int) -> dict[str, Any]:
        """Round end: checkpoint now (idempotent: a second call writes the same state again)."""
        with self._lock:
            path = self.checkpoint()
            return {"status": "checkpointed", "server_steps": self.server_steps, "path": str(path)}

    def checkpoint_if_idle(self) -> bool:
        """Checkpoint a replica that may leave memory: True unless a task is running on it (its lock is
        taken) or it holds work whose loss would cost an agent a retry (a forward waiting for its batch, a
        graph waiting for its gradients). A reload from this checkpoint restores it exactly."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._arrivals or self._inflight is not None or self.trainer.pending_steps:
                return False
            self.checkpoint()
            return True
        finally:
            self._lock.release()

    # ---- scheduling -------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Finish the group in flight when its gradients are in (or its window is over), then start the
        next forward group when it is complete (or its window is over); otherwise ask for a timer."""
        now = time.monotonic()
        self._evict_stale()
        group = self._inflight
        if group is not None:
            expected = {m.ref.client_id for m in group.members}
            window_over = (
                group.first_gradient_at is not None
                and now >= group.first_gradient_at + self.spec.batch_window_s
            )
            answered = set(group.gradients) | group.abandoned
            if (answered == expected and group.gradients) or (window_over and group.gradients):
                self._finish_group(group)
                group = None
            else:
                due = group.created_at + self.spec.inflight_timeout_s
                if group.first_gradient_at is not None:
                    due = min(due, group.first_gradient_at + self.spec.batch_window_s)
                self._request_flush(due - now)
                return
        if not self._arrivals:
            return
        batch = self._next_batch()
        first = min(a.arrived_at for a in batch)
        complete = len(batch) >= len(self.clients) or self.spec.parallel_mode is ParallelMode.sequential
        if complete or now >= first + self.spec.batch_window_s:
            self._run_forward(batch)
        else:
            self._request_flush(first + self.spec.batch_window_s - now)

    def _next_batch(self) -> list[Arrival]:
        """The arrivals that run together next: the earliest (round, step), one per client, in job order."""
        order = {cid: i for i, cid in enumerate(self.clients)}
        earliest = min((a.ref.round_number, a.ref.step) for a in self._arrivals)
        batch: dict[int, Arrival] = {}
        for arrival in self._arrivals:
            if (arrival.ref.round_number, arrival.ref.step) == earliest:
                batch.setdefault(
                    arrival.ref.client_id, arrival
                )  # one per client (newest: see submit_forward)
        ordered = sorted(batch.values(), key=lambda a: order[a.ref.client_id])
        if self.spec.parallel_mode is ParallelMode.sequential:
            return ordered[:1]
        return ordered

    def _request_flush(self, delay_s: float) -> None:
        due = time.monotonic() + max(delay_s, 0.0)
        if self._flush_due is not None and self._flush_due <= due + 0.05:
            return  # an earlier (or equal) flush is already on its way
        self._flush_due = due
        self._schedule_flush(max(delay_s, 0.0) + 0.01)

    def _evict_stale(self) -> None:
        group = self._inflight
        if group is not None and time.monotonic() - group.created_at > self.spec.inflight_timeout_s:
            log.warning(
                "replica %s: dropping the graph of group %s (no gradients in time)", self.replica, group.key
            )
            self.trainer.drop(group.key)
            self._inflight = None

    # ---- the compute -----------------------------------------------------------------------------

    def _run_forward(self, batch: list[Arrival], publish: bool = True) -> InflightGroup:
        """Pad to the longest sequence (right, mask 0), concatenate, one forward, split h1 per client."""
        for arrival in batch:
            self._arrivals = [a for a in self._arrivals if a is not arrival]
        padded_seq = max(a.hidden_states.shape[1] for a in batch)
        hidden_parts, mask_parts, rows = [], [], []
        start = 0
        for arrival in batch:
            rows_n, seq, _ = arrival.hidden_states.shape  # (batch_i, seq_i, hidden)
            pad = padded_seq - seq
            # Right padding with mask 0: causal attention never lets a real token see a later pad, and
            # positions count real tokens only, so each client's rows compute exactly what they would alone.
            hidden_parts.append(nn.functional.pad(arrival.hidden_states, (0, 0, 0, pad)))
            mask_parts.append(nn.functional.pad(arrival.attention_mask, (0, pad)))
            rows.append((start, start + rows_n))
            start += rows_n
        hidden = torch.cat(hidden_parts)  # (sum batch_i, padded_seq, hidden)
        mask = torch.cat(mask_parts)  # (sum batch_i, padded_seq)
        key = self._next_group_key
        self._next_group_key += 1
        h1 = self.trainer.forward(key, hidden, mask)  # (sum batch_i, padded_seq, hidden)
        group = InflightGroup(key, batch, rows, padded_seq, time.monotonic())
        self._inflight = group
        if publish:
            for arrival, (first, end) in zip(batch, rows, strict=True):
                seq = arrival.hidden_states.shape[1]
                self.mailbox.publish(arrival.ref.result_ref(), h1[first:end, :seq, :])
        return group

    def _finish_group(self, group: InflightGroup, journal: bool = True) -> None:
        """One backward for the group (missing gradients count as zero), one optimizer step, journal (not
        when replaying the journal), maybe sync and checkpoint, then the per-client dL/dh0."""
        grad = torch.zeros(
            (group.rows[-1][1], group.padded_seq, self.limits.hidden_size), device=self.device
        )  # (sum batch_i, padded_seq, hidden)
        for member, (first, end) in zip(group.members, group.rows, strict=True):
            entry = group.gradients.get(member.ref.client_id)
            if entry is not None:
                grad[first:end, : member.hidden_states.shape[1], :] = entry[1]
        grad_h0 = self.trainer.backward(group.key, grad)  # (sum batch_i, padded_seq, hidden)
        self._inflight = None
        contributing = [m for m in group.members if m.ref.client_id in group.gradients]
        keys = {applied_key(m.ref) for m in contributing}
        if keys & self.applied:
            # A retried step whose first attempt was applied (journalled) before a crash: answer it, but
            # never apply it twice. (A batch that mixes such a retry with a fresh client step skips the
            # fresh one too: rare, and losing an update beats applying one twice.)
            log.info("replica %s: steps %s already applied; not stepping again", self.replica, sorted(keys))
            self._zero_grads()
        else:
            self.trainer.step()
            self.server_steps += 1
            self.applied |= keys
            if journal:
                self._write_journal_entry(group)
            self._after_step()
        for member, (first, end) in zip(group.members, group.rows, strict=True):
            entry = group.gradients.get(member.ref.client_id)
            if entry is not None:
                seq = member.hidden_states.shape[1]
                self.mailbox.publish(entry[0].result_ref(), grad_h0[first:end, :seq, :])
        # Its messages are consumed; the next checkpoint (which covers this step) lets them expire.
        for ref in [m.ref for m in group.members] + [g[0] for g in group.gradients.values()]:
            self._consumed.extend((ref.blob_key(), ref.result_ref().blob_key()))

    def _zero_grads(self) -> None:
        for parameter in self.trainer.body.parameters():
            parameter.grad = None

    def _after_step(self) -> None:
        """server_hierarchical: FedAvg with the other replicas when due; then a checkpoint when due."""
        if sync_due(self.spec, self.server_steps):
            average_with_peers(self.trainer.body, self.store, self.spec, self.replica, self.server_steps)
        if self.server_steps % self.spec.checkpoint_every == 0:
            self.checkpoint()

    # ---- durability ------------------------------------------------------------------------------

    def _write_journal_entry(self, group: InflightGroup) -> None:
        gradients = [
            group.gradients[m.ref.client_id][0] if m.ref.client_id in group.gradients else None
            for m in group.members
        ]
        self.journal.record(self.server_steps, [m.ref for m in group.members], gradients)

    def checkpoint(self) -> Path:
        """Save the replica, then let what the checkpoint made unnecessary expire (`_expire_consumed`)."""
        path = self.journal.checkpoint(self.trainer, self.server_steps, self.guard, self.applied)
        self._expire_consumed()
        return path

    def _expire_consumed(self) -> None:
        """Step messages (uploads and results) of steps a checkpoint covers, and their journal entries, are
        never read again by a replay: they expire within `CONSUMED_GRACE_S` (an agent fetches its result
        within seconds, a StepClient retries an upload within ~16 s) instead of after `blob_ttl_s`, so the
        blob store holds about `checkpoint_every` steps of messages, not hours of them."""
        journal = range(self._journal_expired_upto + 1, self.server_steps + 1)
        keys = self._consumed + [journal_key(self.spec.job_id, self.replica, index) for index in journal]
        self.store.expire(keys, CONSUMED_GRACE_S)
        self._consumed = []
        self._journal_expired_upto = self.server_steps

    def _restore(self) -> None:
        """Newest checkpoint, then every journalled step after it (replayed from the stored messages)."""
        snapshot = self.journal.restore_checkpoint(self.trainer)
        if snapshot is not None:
            self.guard = ReplayGuard(snapshot.replay_guard)
            self.applied = set(snapshot.applied)
            self.server_steps = snapshot.server_steps
            self._journal_expired_upto = snapshot.server_steps  # the process that checkpointed did it
        self._replay_journal()

    def _replay_journal(self) -> None:
        while True:
            entry = self.journal.entry(self.server_steps + 1)
            if entry is None:
                return
            arrivals = []
            for ref in entry.members:
                blob = self.journal.stored_message(ref)
                hidden, mask = open_activations(self.mailbox.channel(ref.client_id), ref, blob, self.limits)
                note_replayed_sequence(self.guard, ref)
                arrivals.append(Arrival(ref, hidden.to(self.device), mask.to(self.device), time.monotonic()))
            group = self._run_forward(arrivals, publish=False)
            for member, grad_ref in zip(arrivals, entry.gradients, strict=True):
                if grad_ref is None:
                    continue
                blob = self.journal.stored_message(grad_ref)
                shape = tuple(member.hidden_states.shape)
                grad = open_hidden(
                    self.mailbox.channel(grad_ref.client_id), grad_ref, blob, self.limits, shape
                )
                note_replayed_sequence(self.guard, grad_ref)
                group.gradients[grad_ref.client_id] = (grad_ref, grad.to(self.device))
            before = self.server_steps
            self._finish_group(group, journal=False)  # publishes dL/dh0 if the crash came before
            if self.server_steps != before + 1:
                raise JournalGap(f"journal entry {before + 1} did not replay as one applied step")
            log.info("replica %s: replayed journalled step %s", self.replica, self.server_steps)


def _hidden_size(body: nn.Module) -> int:
    config = getattr(getattr(body, "stack", None), "config", None) or getattr(body, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"cannot tell the hidden size of {type(body).__name__}; it has no config.hidden_size")


__all__ = ["ServerReplica", "StepRejected"]
