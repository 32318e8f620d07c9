"""The wire bench's split loop (real step messages at the cut) and the `flglm bench wire --json` command."""

import json

import torch
from typer.testing import CliRunner

from apps.bench.wire import WireLink, channel_key_pair, run_split_steps
from apps.cli.main import app
from flglm.models import load_split_parts
from flglm.trainers import SplitTrainer, TrainConfig
from flglm.wire.directions import Direction


def train(batches: list[dict[str, torch.Tensor]], link: WireLink | None) -> list[float]:
    split = load_split_parts("tiny:llama", parts={"front", "body", "back"})
    trainer = SplitTrainer(split, TrainConfig(lr=3e-3))
    if link is None:
        return [trainer.train_step(batch) for batch in batches]
    return run_split_steps(trainer, batches, link)


def test_float32_envelopes_at_the_cut_change_nothing_and_bfloat16_changes_little(make_batch) -> None:  # type: ignore[no-untyped-def]
    batches = [make_batch("right", batch=4, seq=16, seed=seed) for seed in range(4)]
    reference = train(batches, None)
    link = WireLink(torch.float32, *channel_key_pair())
    assert train(batches, link) == reference  # encryption is lossless: bit-identical training
    assert link.sequence == 4 * len(batches)  # h0, h1, dL/dh1, dL/dh0 per step, each accepted once
    for guard in link.guards.values():  # the receivers' replay guards saw every message
        assert {guard.last_sequence("1", "1", d) for d in Direction} - {None}
    # payload (four float32 hidden-state tensors and h0's int64 mask) plus envelope overhead
    assert link.bytes_sent > len(batches) * (4 * 4 * 16 * 32 * 4 + 4 * 16 * 8)

    bf16_link = WireLink(torch.bfloat16, *channel_key_pair())
    bf16 = train(batches, bf16_link)
    assert bf16 != reference
    assert max(abs(a - b) for a, b in zip(bf16, reference, strict=True)) < 0.05
    assert bf16_link.bytes_sent < 0.6 * link.bytes_sent


def test_bench_wire_cli_prints_one_json_object_last() -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "wire",
            "--json",
            "--model",
            "tiny:llama",
            "--step-batches",
            "1",
            "--loss-steps",
            "2",
            "--repeats",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["throughput"]["shape"] == [8, 512, 4096]
    assert figures["throughput"]["payload_bytes"] == 8 * 512 * 4096 * 2
    assert figures["throughput"]["codec_only_round_trip_s"] > 0
    activations = figures["activations_throughput"]
    assert activations["format"] == "safetensors"
    assert activations["payload_bytes"] > 8 * 512 * 4096 * 2 + 8 * 512 * 8  # hidden states, mask, header
    assert activations["envelope_overhead_bytes"] > 0 and activations["codec_only_round_trip_s"] > 0
    adapters = figures["split_step"]["adapters_up"]
    assert adapters["tensors"] > 0 and adapters["wire_bytes"] > adapters["payload_bytes"] > 0
    assert figures["split_step"]["wire_bfloat16"]["crypto_fraction"] > 0
    assert set(figures["wire_dtype_loss"]) >= {"float32", "bfloat16", "float16"}
