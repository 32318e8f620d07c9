"""One benchmark data owner as its own process: the agent's half of each step over HTTPS, timed.

Run by `flglm bench` (apps/bench/stack.py) as `python -m apps.bench.stack_client <config.json>`. It
does what the client agent does per step (`run_client_step`: front forward, seal, upload, long-poll,
back + loss, backward, seal, upload, long-poll, front backward, optimizer step) on the benchmark's
deterministic batches, and prints one JSON line: per-step start/end (`time.perf_counter`, one monotonic
clock shared by the processes of this machine), real tokens and the sealed bytes sent and received.
Step 0 is an untimed warm-up (the server loads its body on the first message).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from apps.bench.stack_batches import stack_bench_batch
from flglm.adapters import AdapterSpec, add_split_adapters
from flglm.agent_step import ClientChannel, run_client_step
from flglm.models import load_split_parts, load_tokenizer
from flglm.split import SplitPlan
from flglm.step_client import StepClient
from flglm.trainers import ClientSideTrainer, TrainConfig
from flglm.wire.keys import ClientKeyPair, derive_channel_keys, public_key_from_b64


def run_bench_client(config: dict[str, Any]) -> dict[str, Any]:
    """Warm-up step 0, then timed steps 1..steps; figures of the timed steps only."""
    torch.set_num_threads(int(config["threads"]))
    plan = SplitPlan(**config["split_plan"])
    split = load_split_parts(config["model"], plan, parts={"front", "back"})
    add_split_adapters(split, AdapterSpec(**config["adapter"]), int(config["seed"]))
    trainer = ClientSideTrainer(split, TrainConfig(**config["train"]))
    tokenizer = load_tokenizer(config["model"])
    keypair = ClientKeyPair.load(config["key_file"])
    job_id, client_id = int(config["job_id"]), int(config["client_id"])
    keys = derive_channel_keys(
        keypair.private_key, public_key_from_b64(config["server_public_key"]), str(job_id), str(client_id)
    )
    sequence = itertools.count(1)
    client = StepClient(config["base_url"], config["credential"], config["ca_cert"])
    channel = ClientChannel(client, keys, job_id, client_id, torch.float32, lambda: next(sequence), 600.0)
    steps: list[dict[str, float]] = []
    with client:
        for step in range(int(config["steps"]) + 1):
            batch = stack_bench_batch(
                tokenizer, config["batch_size"], config["seq_len"], config["client_index"], step
            )
            up, down = client.bytes_up, client.bytes_down
            start = time.perf_counter()
            loss = run_client_step(trainer, channel, 1, step, batch).loss
            end = time.perf_counter()
            if step == 0:
                continue  # warm-up
            steps.append(
                {
                    "start": start,
                    "end": end,
                    "loss": loss,
                    "tokens": int(batch["attention_mask"].sum()),
                    "bytes_up": client.bytes_up - up,
                    "bytes_down": client.bytes_down - down,
                    "rows": int(batch["input_ids"].shape[0]),
                    "seq": int(batch["input_ids"].shape[1]),
                }
            )
    return {"client_index": config["client_index"], "steps": steps}


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(run_bench_client(config)), flush=True)


if __name__ == "__main__":
    main()
