"""The agent's half of one FL-GLM step over HTTPS, and the round-end exchange of client adapters.

`run_client_step` is one step (docs/architecture.md) on the owner's side: front forward → seal h0 → upload
→ long-poll h1 → back forward + loss → backward → seal dL/dh1 → upload → long-poll dL/dh0 → front backward
→ optimizer step. Token ids, labels and the loss stay in this process. When the server lost the step's graph
(a worker died), the step is run again from the forward with fresh sequence numbers, after dropping the
gradients the lost attempt left in the client's parameters.

The client adapters at the start of round 1 are the deterministic initial adapters every party builds from
the job's seed (`flglm.adapters.add_split_adapters(split, cfg, seed)`), so there is nothing to download
then; after round r each client uploads its adapters (`upload_round_adapters`) and loads the FedAvg'd ones
(`download_round_adapters`) before round r + 1. The agent (client_agent/) owns data, state and the CLI.

`run_client_eval_forward` is the forward-only path for local evaluation: front (no grad) → seal h0 as
`eval_activations` → upload → long-poll `eval_result` → back (no grad) → logits, which stay here.
`remote_score_fn` wraps it as the `score_fn(input_ids, attention_mask)` of `flglm.evaluation`.

Defences (the trainer's `ClientDefence`) apply to everything that leaves: the h0 of training and of eval
forwards, dL/dh1. With a private input block (`private_front`) only the output block's adapters go up and
come down at round ends (`shared_parts`); the input block's stay in this process and its checkpoints.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from flglm.adapters import load_trainable_state_dict, trainable_state_dict
from flglm.evaluation import scores_positions
from flglm.step_client import (
    STEP_GRAPH_MISSING,
    UPLOAD_NOT_FOUND,
    StepClient,
    StepConflict,
    StepHttpError,
    StepNotFound,
)
from flglm.step_messages import (
    PayloadLimits,
    open_adapters,
    open_hidden,
    seal_activations,
    seal_adapters,
    seal_hidden,
)
from flglm.step_protocol import MessageDirection, MessageRef, client_adapters_ref
from flglm.trainers import ClientSideTrainer, LMBatch
from flglm.wire.keys import ChannelKeys


@dataclass
class ClientChannel:
    """Everything one client needs to talk to the server about one job.

    `next_sequence` must return a number larger than every one it returned before for this job, also
    across restarts of the agent (persist it): the server refuses a sequence it has seen (replay).
    """

    client: StepClient
    keys: ChannelKeys  # derive_channel_keys(client private key, server public key, job id, client id)
    job_id: int
    client_id: int
    wire_dtype: torch.dtype
    next_sequence: Callable[[], int]
    result_timeout_s: float = 600.0

    def ref(self, round_number: int, step: int, direction: MessageDirection) -> MessageRef:
        return MessageRef(
            job_id=self.job_id,
            round_number=round_number,
            step=step,
            client_id=self.client_id,
            direction=direction,
            sequence=self.next_sequence(),
        )


@dataclass(frozen=True)
class ClientStepResult:
    loss: float
    attempts: int  # 1 unless the server lost the step and it was run again


def client_parts(trainer: ClientSideTrainer) -> nn.Module:
    """The client's parts under stable names ("front.…", "back.…"): what its checkpoints hold, and what
    FedAvg averages unless the input block is private (see `shared_parts`)."""
    return nn.ModuleDict({"front": trainer.front, "back": trainer.back})


def shared_parts(trainer: ClientSideTrainer) -> nn.Module:
    """The parts whose adapters are uploaded and averaged: both, or only "back.…" with a private front."""
    if trainer.defence is not None and trainer.defence.private_front:
        return nn.ModuleDict({"back": trainer.back})
    return client_parts(trainer)


def run_client_step(
    trainer: ClientSideTrainer,
    channel: ClientChannel,
    round_number: int,
    step: int,
    batch: LMBatch,
    max_attempts: int = 3,
) -> ClientStepResult:
    """One training step through the server; returns the loss (computed here, never sent)."""
    for attempt in range(1, max_attempts + 1):
        try:
            return ClientStepResult(_attempt_step(trainer, channel, round_number, step, batch), attempt)
        except (StepConflict, StepNotFound) as exc:
            if not server_lost_step(exc) or attempt == max_attempts:
                raise
            for parameter in client_parts(trainer).parameters():
                parameter.grad = None  # the back's gradients of the lost attempt must not count twice
    raise AssertionError("unreachable")


def server_lost_step(exc: StepHttpError) -> bool:
    """The server lost this attempt (its graph, or the upload itself when Redis restarted without
    persistence): run the step again from its forward, with new sequence numbers."""
    return exc.code in (STEP_GRAPH_MISSING, UPLOAD_NOT_FOUND)


def _attempt_step(
    trainer: ClientSideTrainer, channel: ClientChannel, round_number: int, step: int, batch: LMBatch
) -> float:
    h0 = trainer.forward_front(batch)  # (batch, seq, hidden)
    limits = PayloadLimits(channel.wire_dtype, h0.shape[-1], h0.shape[0], h0.shape[1])
    forward = channel.ref(round_number, step, MessageDirection.activations)
    sealed = seal_activations(channel.keys, forward, h0, batch["attention_mask"], channel.wire_dtype)
    channel.client.upload(forward, sealed)
    h1_sealed = channel.client.wait_result(forward, channel.result_timeout_s)
    h1 = open_hidden(
        channel.keys, forward.result_ref(), h1_sealed, limits, tuple(h0.shape)
    )  # (batch, seq, hidden)
    loss = trainer.forward_back(h1, batch)
    grad_h1 = trainer.backward_back()  # (batch, seq, hidden)
    backward = channel.ref(round_number, step, MessageDirection.gradients)
    channel.client.upload(backward, seal_hidden(channel.keys, backward, grad_h1, channel.wire_dtype))
    grad_sealed = channel.client.wait_result(backward, channel.result_timeout_s)
    grad_h0 = open_hidden(channel.keys, backward.result_ref(), grad_sealed, limits, tuple(h0.shape))
    trainer.backward_front(grad_h0)  # (batch, seq, hidden) into the input block
    trainer.step()
    return float(loss.detach())


def upload_round_adapters(
    trainer: ClientSideTrainer, channel: ClientChannel, round_number: int, example_count: int
) -> None:
    """Send this client's adapters at the end of `round_number` (idempotent for the same sealed bytes;
    the StepClient retries the same bytes, so a lost answer is harmless)."""
    ref = client_adapters_ref(channel.job_id, round_number, channel.client_id)
    sealed = seal_adapters(channel.keys, ref, trainable_state_dict(shared_parts(trainer)))
    channel.client.upload_adapters(channel.job_id, round_number, sealed, example_count)


def download_round_adapters(
    trainer: ClientSideTrainer, channel: ClientChannel, round_number: int, timeout_s: float = 600.0
) -> dict[str, torch.Tensor]:
    """Wait for the FedAvg of `round_number`, load it into the shared parts and return it."""
    parts = shared_parts(trainer)
    expected = {name: (t.dtype, tuple(t.shape)) for name, t in trainable_state_dict(parts).items()}
    result = client_adapters_ref(channel.job_id, round_number, channel.client_id).result_ref()
    sealed = channel.client.get_adapters(channel.job_id, round_number, timeout_s)
    state = open_adapters(channel.keys, result, sealed, expected=expected)
    load_trainable_state_dict(parts, state)
    return state


@contextmanager
def _evaluating(trainer: ClientSideTrainer, device: torch.device) -> Iterator[None]:
    """Front and back in eval mode (no adapter dropout), no autograd; train mode again afterwards."""
    parts = client_parts(trainer)
    parts.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=trainer.cfg.bf16_autocast),
        ):
            yield
    finally:
        parts.train()


def run_client_eval_forward(
    trainer: ClientSideTrainer,
    channel: ClientChannel,
    round_number: int,
    eval_index: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_attempts: int = 3,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (batch, seq, vocab) of the whole split model for one batch, through the server, no training;
    (n_kept, vocab) where the (batch, seq) bool mask `positions` is True, if given (the head runs there only).

    `eval_index` numbers the eval batches of a round (the message's "step"); eval messages have their own
    direction, so it never collides with a training step. The server runs its body with its current
    adapters under no_grad and keeps nothing; nothing here touches gradients or the optimizer.
    """
    with _evaluating(trainer, input_ids.device):
        h0 = trainer.eval_front(input_ids, attention_mask)  # (batch, seq, hidden), defended
    limits = PayloadLimits(channel.wire_dtype, h0.shape[-1], h0.shape[0], h0.shape[1])
    for attempt in range(1, max_attempts + 1):
        forward = channel.ref(round_number, eval_index, MessageDirection.eval_activations)
        channel.client.upload(
            forward, seal_activations(channel.keys, forward, h0, attention_mask, channel.wire_dtype)
        )
        try:
            sealed = channel.client.wait_result(forward, channel.result_timeout_s)
            break
        except StepNotFound as exc:  # the server lost the upload (Redis restarted): send it again
            if not server_lost_step(exc) or attempt == max_attempts:
                raise
    h1 = open_hidden(
        channel.keys, forward.result_ref(), sealed, limits, tuple(h0.shape)
    )  # (batch, seq, hidden)
    with _evaluating(trainer, input_ids.device):
        back_dtype = next(
            (p.dtype for p in trainer.back.parameters() if p.is_floating_point()), torch.float32
        )
        keep = 0 if positions is None else positions
        return trainer.back(h1.to(back_dtype), attention_mask, logits_to_keep=keep).float()


def remote_score_fn(
    trainer: ClientSideTrainer, channel: ClientChannel, round_number: int, first_index: int = 0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`score_fn(input_ids, attention_mask) -> logits` for `flglm.evaluation`, one eval forward per call,
    numbering the round's eval batches from `first_index`."""
    indices = itertools.count(first_index)

    def score(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        return run_client_eval_forward(
            trainer, channel, round_number, next(indices), input_ids, attention_mask, positions=positions
        )

    return scores_positions(score)
