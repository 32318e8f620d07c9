"""The wire benchmark's split loop (real envelopes at the cut) and the `flglm bench wire --json` command."""

import json

import torch
from typer.testing import CliRunner

from flglm.bench.wire import WireLink, channel_key_pair, run_split_steps
from flglm.cli.main import app
from flglm.models import load_split_parts
from flglm.trainers import SplitTrainer, TrainConfig


def train(batches: list[dict[str, torch.Tensor]], link: WireLink | None) -> list[float]:
    split = load_split_parts("tiny:llama", parts={"front", "body", "back"})
    trainer = SplitTrainer(split, TrainConfig(lr=3e-3))
    if link is None:
        return [trainer.train_step(batch) for batch in batches]
    return run_split_steps(trainer, batches, link)


def test_float32_envelopes_at_the_cut_change_nothing_and_bfloat16_changes_little(make_batch) -> None:  # type: ignore[no-untyped-def]
    batches = [make_batch("right", batch=4, seq=16, seed=seed) for seed in range(4)]
    reference = train(batches, None)
    link = WireLink(None, *channel_key_pair())
    assert train(batches, link) == reference  # encryption is lossless: bit-identical training
    assert link.sequence == 4 * len(batches)  # h0, h1, dL/dh1, dL/dh0 per step, each accepted once
    assert link.bytes_sent > 4 * len(batches) * 4 * 16 * 32 * 4  # payload plus envelope overhead

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
    assert figures["split_step"]["wire_bfloat16"]["crypto_fraction"] > 0
    assert set(figures["wire_dtype_loss"]) >= {"float32", "bfloat16", "float16"}
