"""Sealing and opening of step messages (a `MessageRef` + tensors ↔ an envelope), shared by agent and worker.

What each direction carries inside its envelope:

- activations, eval_activations: a safetensors dict {"hidden_states": (batch, seq, hidden) in the job's
  wire dtype, "attention_mask": (batch, seq) int64 of 0/1}
- activations_result, gradients, gradients_result, eval_result: one tensor (batch, seq, hidden), sent in
  the job's wire dtype and restored to the sender's compute dtype by `open_tensor`
- adapters_up, adapters_down: a safetensors dict of trainable adapter weights

The envelope header binds (job, round, step, client, direction, sequence) into the AEAD data, and the
opener insists they equal the `MessageRef` it was asked to open, so a message moved to another address
fails. Checks of dtype/shape/limits raise `WrongPayload` naming the problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flglm.contracts.refusals import ReplayedMessage, StepRejected, TamperedMessage, WrongTensor
from flglm.step_protocol import MessageDirection, MessageRef
from flglm.wire.codec import cast_for_wire, cast_from_wire, dtype_name
from flglm.wire.directions import Direction
from flglm.wire.envelope import EnvelopeHeader
from flglm.wire.errors import (
    EnvelopeMismatchError,
    PayloadTooLargeError,
    ReplayError,
    UnexpectedTensorError,
    WireError,
)
from flglm.wire.keys import ChannelKeys
from flglm.wire.sequence import SequenceGuard
from flglm.wire.tensor_envelope import open_tensor, open_tensors, seal_tensor, seal_tensors

FORWARD_DIRECTIONS = (MessageDirection.activations, MessageDirection.eval_activations)
HIDDEN_STATES = "hidden_states"
ATTENTION_MASK = "attention_mask"


class WrongPayload(WireError):
    """An authentic payload that does not fit the job (dtype, shape, hidden size, limits, mask values)."""

    http_status = 422


@dataclass(frozen=True)
class PayloadLimits:
    """What a job accepts: the wire dtype, the model's hidden size and the batch/sequence caps."""

    wire_dtype: torch.dtype
    hidden_size: int
    max_batch_size: int
    max_seq_len: int

    @property
    def max_bytes(self) -> int:
        # Hidden states (at most 4 bytes per element) + mask of the largest batch the job allows.
        cells = self.max_batch_size * self.max_seq_len
        return cells * (self.hidden_size * 4 + 8) + 4096


def header_for(ref: MessageRef) -> EnvelopeHeader:
    return EnvelopeHeader(
        job_id=str(ref.job_id),
        round=ref.round_number,
        step=ref.step,
        client_id=str(ref.client_id),
        direction=Direction(ref.direction.value),
        sequence=ref.sequence,
    )


def _check_opened(ref: MessageRef, header: EnvelopeHeader) -> None:
    # open_* already compared job, client, direction, round and step; the sequence is part of the address.
    if header.sequence != ref.sequence:
        raise EnvelopeMismatchError(f"envelope sequence is {header.sequence}, expected {ref.sequence}")


def seal_activations(
    keys: ChannelKeys,
    ref: MessageRef,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    wire_dtype: torch.dtype,
) -> bytes:
    """Envelope of h0 (batch, seq, hidden) and its attention mask (batch, seq), for training or evaluation."""
    _require(ref, *FORWARD_DIRECTIONS)
    tensors = {
        HIDDEN_STATES: cast_for_wire(hidden_states.detach(), wire_dtype).contiguous(),
        ATTENTION_MASK: attention_mask.long().contiguous(),
    }
    return bytes(seal_tensors(keys, header_for(ref), tensors))


def open_activations(
    keys: ChannelKeys,
    ref: MessageRef,
    data: bytes,
    limits: PayloadLimits,
    replay_guard: SequenceGuard | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states (batch, seq, hidden) in `compute_dtype`, attention_mask (batch, seq)), all checked."""
    _require(ref, *FORWARD_DIRECTIONS)
    header, tensors = open_tensors(
        keys,
        data,
        expected_job=str(ref.job_id),
        expected_client=str(ref.client_id),
        expected_direction=Direction(ref.direction.value),
        expected_round=ref.round_number,
        max_payload_bytes=limits.max_bytes,
    )
    if header.step != ref.step:
        raise EnvelopeMismatchError(f"envelope step is {header.step}, expected {ref.step}")
    _check_opened(ref, header)
    if set(tensors) != {HIDDEN_STATES, ATTENTION_MASK}:
        raise WrongPayload(
            f"{ref.direction.value} must hold exactly {HIDDEN_STATES!r} and {ATTENTION_MASK!r}, "
            f"got {sorted(tensors)}"
        )
    hidden, mask = tensors[HIDDEN_STATES], tensors[ATTENTION_MASK]
    if hidden.dtype != limits.wire_dtype:
        raise WrongPayload(
            f"{ref.direction.value} dtype is {dtype_name(hidden.dtype)}; this job sends "
            f"{dtype_name(limits.wire_dtype)}"
        )
    _check_hidden(hidden, limits, ref.direction.value)
    if mask.dtype != torch.int64 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise WrongPayload(
            f"attention_mask must be int64 of shape {list(hidden.shape[:2])}, got "
            f"{dtype_name(mask.dtype)} {list(mask.shape)}"
        )
    if bool(((mask != 0) & (mask != 1)).any()) or bool((mask.sum(dim=1) == 0).any()):
        raise WrongPayload("attention_mask may only hold 0 and 1, with at least one 1 per row")
    if replay_guard is not None:
        replay_guard.accept(header)  # only after every check: a refused message leaves the stream as it was
    return cast_from_wire(hidden, compute_dtype), mask


def seal_hidden(keys: ChannelKeys, ref: MessageRef, tensor: torch.Tensor, wire_dtype: torch.dtype) -> bytes:
    """Envelope of one (batch, seq, hidden) tensor: h1 (training or eval), dL/dh1 or dL/dh0."""
    _require(
        ref,
        MessageDirection.activations_result,
        MessageDirection.gradients,
        MessageDirection.gradients_result,
        MessageDirection.eval_result,
    )
    return bytes(seal_tensor(keys, header_for(ref), tensor.detach().contiguous(), wire_dtype=wire_dtype))


def open_hidden(
    keys: ChannelKeys,
    ref: MessageRef,
    data: bytes,
    limits: PayloadLimits,
    expected_shape: Sequence[int] | None = None,
    replay_guard: SequenceGuard | None = None,
) -> torch.Tensor:
    """The tensor of an h1 (training or eval) / dL/dh1 / dL/dh0 envelope, in the sender's compute dtype,
    all checked."""
    _require(
        ref,
        MessageDirection.activations_result,
        MessageDirection.gradients,
        MessageDirection.gradients_result,
        MessageDirection.eval_result,
    )
    header, tensor = open_tensor(
        keys,
        data,
        expected_job=str(ref.job_id),
        expected_client=str(ref.client_id),
        expected_direction=Direction(ref.direction.value),
        expected_round=ref.round_number,
        expected_step=ref.step,
        expected_wire_dtype=limits.wire_dtype,
        max_payload_bytes=limits.max_bytes,
    )
    _check_opened(ref, header)
    if not tensor.is_floating_point():
        raise WrongPayload(f"{ref.direction.value} must be a float tensor, got {dtype_name(tensor.dtype)}")
    _check_hidden(tensor, limits, ref.direction.value)
    if expected_shape is not None and tuple(tensor.shape) != tuple(expected_shape):
        raise WrongPayload(
            f"{ref.direction.value} has shape {list(tensor.shape)}; this step expects {list(expected_shape)}"
        )
    if replay_guard is not None:
        replay_guard.accept(header)
    return tensor


def seal_adapters(keys: ChannelKeys, ref: MessageRef, state: Mapping[str, torch.Tensor]) -> bytes:
    """Envelope of an adapter state dict (client upload at round end, or its FedAvg result)."""
    _require(ref, MessageDirection.adapters_up, MessageDirection.adapters_down)
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    return bytes(seal_tensors(keys, header_for(ref), tensors))


def open_adapters(
    keys: ChannelKeys,
    ref: MessageRef,
    data: bytes,
    expected: Mapping[str, tuple[torch.dtype, Sequence[int]]] | None = None,
    replay_guard: SequenceGuard | None = None,
    max_bytes: int = 2**31,
) -> dict[str, torch.Tensor]:
    """An adapter state dict; with `expected`, names, dtypes and shapes must match it exactly."""
    _require(ref, MessageDirection.adapters_up, MessageDirection.adapters_down)
    header, tensors = open_tensors(
        keys,
        data,
        expected_job=str(ref.job_id),
        expected_client=str(ref.client_id),
        expected_direction=Direction(ref.direction.value),
        expected_round=ref.round_number,
        expected=expected,
        max_payload_bytes=max_bytes,
    )
    if header.step != ref.step:
        raise EnvelopeMismatchError(f"envelope step is {header.step}, expected {ref.step}")
    _check_opened(ref, header)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WrongPayload(f"adapter tensor {name!r} holds NaN or infinite values")
    if replay_guard is not None:
        replay_guard.accept(header)
    return tensors


def _require(ref: MessageRef, *directions: MessageDirection) -> None:
    if ref.direction not in directions:
        allowed = ", ".join(d.value for d in directions)
        raise WireError(f"a {ref.direction.value} message cannot be handled here (expects {allowed})")


def _check_hidden(tensor: torch.Tensor, limits: PayloadLimits, what: str) -> None:
    if tensor.dim() != 3 or tensor.shape[-1] != limits.hidden_size:
        raise WrongPayload(f"{what} shape {list(tensor.shape)}; expected (batch, seq, {limits.hidden_size})")
    batch, seq, _ = tensor.shape  # (batch, seq, hidden)
    if not 1 <= batch <= limits.max_batch_size:
        raise WrongPayload(f"{what} batch {batch} outside 1..{limits.max_batch_size}")
    if not 1 <= seq <= limits.max_seq_len:
        raise WrongPayload(f"{what} sequence length {seq} outside 1..{limits.max_seq_len}")
    if not bool(torch.isfinite(tensor).all()):
        raise WrongPayload(f"{what} holds NaN or infinite values")


def rejection_from_wire(exc: Exception) -> StepRejected:
    """The engine's refusal for a wire-format error raised while opening an upload."""
    if isinstance(exc, ReplayError):
        return ReplayedMessage(str(exc))
    if isinstance(exc, WrongPayload | UnexpectedTensorError | PayloadTooLargeError):
        return WrongTensor(str(exc))
    return TamperedMessage(str(exc))
