"""`flglm bench split`: cost of the split itself (centralized vs in-process split step) and client memory.

Step times are measured side by side in one run: the two trainers alternate (and swap who goes first each
round), so machine load hits both alike; the ratio of the medians is reported in wall-clock and in process
CPU time (the one to trust on a shared machine, with `--threads 1`). Client memory is reported three ways:
parameter bytes of the parts a client loads vs the whole model; resident memory of a fresh process that
loads only the client parts vs one that loads the whole model (after one forward pass, so every page is
touched); and, by counting shapes from a config, for a 7B Llama.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from flglm.adapters import AdapterSpec, add_split_adapters, ptuning_v2_wire_bytes_per_sample
from flglm.models import load_config, load_model, load_tokenizer
from flglm.split import SplitPlan, split_model
from flglm.tiny_models import TINY_CORPUS
from flglm.trainers import CentralizedTrainer, SplitTrainer, TrainConfig, tokenize_lm_batch

# Llama-2-7B's published shape.
LLAMA_7B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": False,
}


def split_parameter_counts(config: PretrainedConfig, plan: SplitPlan) -> dict[str, int]:
    """Parameters per part, counted from the config's shapes on the meta device (no memory, any size)."""
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # so a tied head is counted once, as in memory
    split = split_model(model, plan)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    client = count(split.as_module_dict(["front", "back"]))
    return {
        "front": count(split.part("front")),
        "body": count(split.part("body")),
        "back": count(split.part("back")),
        "client": client,
        "full": count(model),
    }


def benchmark_batch(ref: str, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A full (batch_size, seq_len) batch of real text, so both trainers see exactly the same tokens."""
    tokenizer = load_tokenizer(ref)
    text = " ".join(TINY_CORPUS)
    texts = [text[i * 37 :] + " " + text[: i * 37] for i in range(batch_size)]  # distinct rows
    return tokenize_lm_batch(tokenizer, texts, max_length=seq_len)


def step_time_ratio(
    ref: str, plan: SplitPlan, batch_size: int, seq_len: int, rounds: int, adapters: AdapterSpec
) -> dict[str, Any]:
    """Median step time of centralized vs split training of the same model, adapters and batch."""
    model = load_model(ref)
    add_split_adapters(split_model(model, plan), adapters, seed=0)
    cfg = TrainConfig(lr=1e-4)
    central = CentralizedTrainer(copy.deepcopy(model), cfg)
    split = SplitTrainer(split_model(copy.deepcopy(model), plan), cfg)
    del model
    batch = benchmark_batch(ref, batch_size, seq_len)
    timings: dict[str, list[float]] = {"centralized": [], "split": []}
    cpu_timings: dict[str, list[float]] = {"centralized": [], "split": []}
    trainers: dict[str, CentralizedTrainer | SplitTrainer] = {"centralized": central, "split": split}
    for name in trainers:  # warm-up: first-call allocations are not the split's cost
        trainers[name].train_step(batch)
    for round_index in range(rounds):
        order = ("centralized", "split") if round_index % 2 == 0 else ("split", "centralized")
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            trainers[name].train_step(batch)
            timings[name].append(time.perf_counter() - start)
            cpu_timings[name].append(time.process_time() - cpu_start)
    central_s, split_s = statistics.median(timings["centralized"]), statistics.median(timings["split"])
    pair_ratios = [c / s for c, s in zip(timings["centralized"], timings["split"], strict=True)]
    central_cpu, split_cpu = (
        statistics.median(cpu_timings["centralized"]),
        statistics.median(cpu_timings["split"]),
    )
    return {
        "centralized_step_s": central_s,
        "split_step_s": split_s,
        "ratio_centralized_over_split": central_s / split_s,
        "median_pair_ratio": statistics.median(pair_ratios),
        # CPU seconds of this process: robust to other processes on a shared machine (exact with 1 thread).
        "centralized_step_cpu_s": central_cpu,
        "split_step_cpu_s": split_cpu,
        "cpu_ratio_centralized_over_split": central_cpu / split_cpu,
        "target_ratio": 0.98,
        "rounds": rounds,
        "batch": [int(batch["input_ids"].shape[0]), int(batch["input_ids"].shape[1])],
        "torch_threads": torch.get_num_threads(),
    }


_RSS_PROBE = """
import json, sys, torch
from flglm.models import load_split_parts, parameter_bytes
from flglm.process_memory import resident_bytes
from flglm.split import SplitPlan
ref, front, back, parts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), set(sys.argv[4].split(","))
torch.set_num_threads(1)
baseline = resident_bytes()
split = load_split_parts(ref, SplitPlan(front, back), parts=parts)
ids = torch.ones(1, 8, dtype=torch.long)
with torch.no_grad():
    hidden = split.body.stack.config.hidden_size if split.body is not None else 0
    h = split.front(ids) if split.front is not None else torch.zeros(1, 8, hidden)
    if split.body is not None:
        h = split.body(h)
    if split.back is not None:
        split.back(h)
print(json.dumps({"baseline_rss": baseline, "rss": resident_bytes(),
                  "parameter_bytes": parameter_bytes(split.as_module_dict())}))
"""


def resident_memory(ref: str, plan: SplitPlan, parts: Sequence[str]) -> dict[str, int]:
    """RSS of a fresh process holding only `parts` (after imports, and after loading + one forward)."""
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _RSS_PROBE,
            ref,
            str(plan.front_layers),
            str(plan.back_layers),
            ",".join(parts),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    figures: dict[str, int] = json.loads(completed.stdout.strip().splitlines()[-1])
    figures["loaded_rss"] = figures["rss"] - figures["baseline_rss"]
    return figures


def client_memory(ref: str, plan: SplitPlan) -> dict[str, Any]:
    """Client parts vs the whole model: parameter bytes and measured resident memory."""
    client = resident_memory(ref, plan, ["front", "back"])
    full = resident_memory(ref, plan, ["front", "body", "back"])
    counts = split_parameter_counts(load_config(ref), plan)
    return {
        "client_parameter_bytes": client["parameter_bytes"],
        "full_parameter_bytes": full["parameter_bytes"],
        "parameter_bytes_ratio": client["parameter_bytes"] / full["parameter_bytes"],
        "client_rss_bytes": client["rss"],
        "full_rss_bytes": full["rss"],
        "rss_ratio": client["rss"] / full["rss"],
        "client_loaded_rss_bytes": client["loaded_rss"],
        "full_loaded_rss_bytes": full["loaded_rss"],
        "loaded_rss_ratio": client["loaded_rss"] / full["loaded_rss"],
        "parameter_counts": counts,
    }


def llama_7b_memory(plan: SplitPlan) -> dict[str, Any]:
    """Client vs full parameters of Llama-2-7B, counted from its config; bytes at bf16."""
    counts = split_parameter_counts(LlamaConfig(**LLAMA_7B), plan)
    return {
        "parameter_counts": counts,
        "client_ratio": counts["client"] / counts["full"],
        "client_bf16_bytes": 2 * counts["client"],
        "full_bf16_bytes": 2 * counts["full"],
    }


def wire_figures(ref: str, plan: SplitPlan, seq_len: int) -> dict[str, Any]:
    """Per-sample traffic of our protocol (h0, h1, dL/dh1, dL/dh0 in bf16) vs P-tuning v2 prefixes."""
    config = load_config(ref)
    activations = 4 * seq_len * int(config.hidden_size) * 2
    body_layers = len(plan.body_range(int(config.num_hidden_layers)))
    prefixes = ptuning_v2_wire_bytes_per_sample(config, body_layers, pre_seq_len=128)
    return {
        "activation_bytes_per_sample_bf16": activations,
        "ptuning_v2_prefix_bytes_per_sample_fp16": prefixes,
        "ptuning_v2_pre_seq_len": 128,
        "seq_len": seq_len,
    }


def run_split_bench(
    model_ref: str = "smollm2-135m",
    batch_size: int = 4,
    seq_len: int = 64,
    rounds: int = 10,
    front_layers: int = 1,
    back_layers: int = 1,
    memory: bool = True,
    threads: int = 0,
) -> dict[str, Any]:
    """All figures of `flglm bench split`, as one JSON-able dict (threads 0: torch's default)."""
    if threads > 0:  # on a shared machine fewer threads than cores avoids OpenMP spin contention
        torch.set_num_threads(threads)
    plan = SplitPlan(front_layers=front_layers, back_layers=back_layers)
    result: dict[str, Any] = {
        "bench": "split",
        "model": model_ref,
        "plan": {"front_layers": front_layers, "back_layers": back_layers},
        "adapters": "lora r=8 all-linear on front, body and back",
        "step_time": step_time_ratio(model_ref, plan, batch_size, seq_len, rounds, AdapterSpec()),
        "llama_7b": llama_7b_memory(plan),
        "wire": wire_figures(model_ref, plan, seq_len),
    }
    if memory:
        result["client_memory"] = client_memory(model_ref, plan)
    return result
