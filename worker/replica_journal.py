"""A replica's durability: the write-once journal of applied steps, checkpoints, what replay reads back.

Journal entry `journal:<job>:<replica>:<n>` names the messages that optimizer step n used (the forward of
every member, and the gradients of those that sent them); it is written before any result of step n is
published. A checkpoint holds the adapters, the optimizer and scheduler state, the replay guard and the
`applied` set after some step; a restarted replica loads the newest one and replays the journal entries
after it (see worker.replica). Nothing here holds a lock: the replica calls it under its own.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flglm.adapters import load_trainable_state_dict, trainable_state_dict
from flglm.contracts.blob_store import BlobStore, PutOutcome
from flglm.contracts.refusals import JournalGap
from flglm.step_messages import header_for
from flglm.step_protocol import MessageRef, WorkerJobSpec
from flglm.trainers import ServerSideTrainer
from flglm.wire.errors import ReplayError
from flglm.wire.sequence import ReplayGuard
from worker.checkpoints import ReplicaSnapshot, latest_snapshot, replica_dir, save_snapshot


def journal_key(job_id: int, replica: int, index: int) -> str:
    return f"journal:{job_id}:{replica}:{index}"


def applied_key(ref: MessageRef) -> str:
    """The `applied` set's name of one client step: "round:step:client"."""
    return f"{ref.round_number}:{ref.step}:{ref.client_id}"


@dataclass(frozen=True)
class JournalEntry:
    """The messages one applied optimizer step used."""

    members: list[MessageRef]  # the forward of each member of the group, in batch order
    gradients: list[MessageRef | None]  # per member: its gradients, or None when it sent none


class ReplicaJournal:
    """The journal and the checkpoints of replica `replica` of `spec`'s job."""

    def __init__(self, spec: WorkerJobSpec, replica: int, store: BlobStore) -> None:
        self.spec, self.replica, self.store = spec, replica, store

    # ---- the journal ------------------------------------------------------------------------------

    def record(
        self, index: int, members: Sequence[MessageRef], gradients: Sequence[MessageRef | None]
    ) -> None:
        """Write entry `index` once; a different entry already there means two workers serve one replica."""
        entry = {
            "members": [ref.model_dump(mode="json") for ref in members],
            "gradients": [None if ref is None else ref.model_dump(mode="json") for ref in gradients],
        }
        data = json.dumps(entry, sort_keys=True).encode()
        outcome = self.store.put_if_absent(
            journal_key(self.spec.job_id, self.replica, index), data, self.spec.blob_ttl_s
        )
        if outcome is PutOutcome.conflict:
            # Another process applied a different step at this index: two workers serve one replica.
            raise RuntimeError(
                f"journal entry {index} of job {self.spec.job_id} replica {self.replica} was "
                "written by another worker; exactly one worker process must consume a replica's queue"
            )

    def entry(self, index: int) -> JournalEntry | None:
        """Entry `index`, or None when no step `index` was journalled."""
        data = self.store.get(journal_key(self.spec.job_id, self.replica, index))
        if data is None:
            return None
        entry = json.loads(data)
        return JournalEntry(
            members=[MessageRef.model_validate(m) for m in entry["members"]],
            gradients=[None if g is None else MessageRef.model_validate(g) for g in entry["gradients"]],
        )

    def stored_message(self, ref: MessageRef) -> bytes:
        """The stored bytes of a message a journalled step used, or JournalGap when it expired."""
        blob = self.store.get(ref.blob_key())
        if blob is None:
            raise JournalGap(
                f"message {ref.blob_key()} of a journalled step expired before it was checkpointed; "
                "raise blob_ttl_s or lower checkpoint_every"
            )
        return blob

    # ---- checkpoints ------------------------------------------------------------------------------

    def checkpoint(
        self, trainer: ServerSideTrainer, server_steps: int, guard: ReplayGuard, applied: set[str]
    ) -> Path:
        """Save the trainer's adapters, optimizer and scheduler with the counters; returns the file."""
        optimizer = trainer.optimizer.optimizer
        scheduler = trainer.optimizer.scheduler
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups: list[dict[str, Any]] = []
        if optimizer is not None:
            saved = optimizer.state_dict()
            state = {int(i): dict(s) for i, s in saved["state"].items()}
            groups = saved["param_groups"]
        scheduler_state = {}
        if scheduler is not None:
            scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        snapshot = ReplicaSnapshot(
            server_steps=server_steps,
            adapters=trainable_state_dict(trainer.body),
            optimizer_state=state,
            optimizer_param_groups=groups,
            scheduler_state=scheduler_state,
            replay_guard=guard.state(),
            applied=sorted(applied),
        )
        return save_snapshot(replica_dir(self.spec.checkpoint_dir, self.replica), snapshot)

    def restore_checkpoint(self, trainer: ServerSideTrainer) -> ReplicaSnapshot | None:
        """Load the newest checkpoint's adapters, optimizer and scheduler into `trainer`; returns it (for
        its counters, guard and `applied`), or None when there is none."""
        snapshot = latest_snapshot(replica_dir(self.spec.checkpoint_dir, self.replica))
        if snapshot is None:
            return None
        load_trainable_state_dict(trainer.body, snapshot.adapters)
        optimizer = trainer.optimizer.optimizer
        if optimizer is not None and snapshot.optimizer_param_groups:
            optimizer.load_state_dict(
                {"state": snapshot.optimizer_state, "param_groups": snapshot.optimizer_param_groups}
            )
        scheduler = trainer.optimizer.scheduler
        if scheduler is not None and snapshot.scheduler_state:
            scheduler.load_state_dict({**scheduler.state_dict(), **snapshot.scheduler_state})
        return snapshot


def note_replayed_sequence(guard: ReplayGuard, ref: MessageRef) -> None:
    """Record a replayed message's sequence in `guard`. The checkpointed guard may already hold a later
    sequence (accepted, never applied): keep the max."""
    with contextlib.suppress(ReplayError):
        guard.accept(header_for(ref))
