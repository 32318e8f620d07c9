"""LoRA on split parts: frozen base, deterministic init, strict state dicts, FedAvg, P-tuning v2 wire cost."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig

from flglm.adapters import (
    AdapterSpec,
    add_adapters,
    add_split_adapters,
    fedavg,
    load_trainable_state_dict,
    ptuning_v2_wire_bytes_per_sample,
    trainable_state_dict,
)
from flglm.models import load_split_parts
from flglm.split import SplitPlan, split_model
from flglm.tiny_models import build_tiny_model


def test_lora_freezes_base_and_adapts_every_linear_but_the_head() -> None:
    model = build_tiny_model("llama")
    parts = add_split_adapters(split_model(model), AdapterSpec(r=4), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable}
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {a.split(".")[-1] for a in adapted} == projections
    assert len(adapted) == 4 * len(projections)  # every layer of every part
    assert not any("lm_head" in n for n in trainable)
    assert parts.back is not None and not parts.back.lm_head.weight.requires_grad


def test_fresh_adapters_leave_the_output_unchanged(make_batch) -> None:  # type: ignore[no-untyped-def]
    batch = make_batch("left")
    for arch in ("llama", "gpt2"):  # gpt2: Conv1D layers, adapted with fan_in_fan_out
        model = build_tiny_model(arch)
        with torch.no_grad():
            before = split_model(model)(batch["input_ids"], batch["attention_mask"])
            parts = add_split_adapters(split_model(model), AdapterSpec(), seed=1)
            assert trainable_state_dict(parts.as_module_dict())
            after = parts(batch["input_ids"], batch["attention_mask"])
        assert torch.equal(before, after)  # LoRA B starts at zero


def test_gpt2_conv1d_lora_changes_output_once_trained(make_batch) -> None:  # type: ignore[no-untyped-def]
    batch = make_batch("none")
    parts = add_split_adapters(split_model(build_tiny_model("gpt2")), AdapterSpec(), seed=1)
    module = parts.as_module_dict()
    targets = {n.split(".lora_")[0].split(".")[-1] for n in trainable_state_dict(module)}
    assert targets == {"c_attn", "c_proj", "c_fc"}
    state = {k: torch.full_like(v, 0.01) for k, v in trainable_state_dict(module).items()}
    with torch.no_grad():
        before = parts(batch["input_ids"], batch["attention_mask"])
        load_trainable_state_dict(module, state)
        after = parts(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(before, after)


def test_same_seed_same_adapters_different_seed_different() -> None:
    def adapters(seed: int) -> dict[str, torch.Tensor]:
        parts = add_split_adapters(split_model(build_tiny_model("qwen2")), AdapterSpec(), seed=seed)
        return trainable_state_dict(parts.as_module_dict())

    first, again, other = adapters(7), adapters(7), adapters(8)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)


def test_client_and_worker_processes_get_the_in_process_adapters() -> None:
    cfg = AdapterSpec(r=4)
    everything = add_split_adapters(split_model(build_tiny_model("llama", seed=3)), cfg, seed=5)
    client = add_split_adapters(load_split_parts("tiny:llama:3", parts={"front", "back"}), cfg, seed=5)
    worker = add_split_adapters(load_split_parts("tiny:llama:3", parts={"body"}), cfg, seed=5)
    for name, module in [*client.present_parts().items(), *worker.present_parts().items()]:
        expected = trainable_state_dict(everything.part(name))
        got = trainable_state_dict(module)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in got), name


def test_parts_can_be_left_without_adapters() -> None:
    parts = add_split_adapters(split_model(build_tiny_model("llama")), AdapterSpec(parts=["body"]), seed=0)
    assert not trainable_state_dict(parts.part("front")) and not trainable_state_dict(parts.part("back"))
    assert trainable_state_dict(parts.part("body"))


def test_named_targets_and_bad_targets() -> None:
    module = add_adapters(
        split_model(build_tiny_model("llama")).part("body"),
        AdapterSpec(target_modules=["q_proj", "v_proj"]),
        seed=0,
    )
    adapted = {n.split(".lora_")[0].split(".")[-1] for n in trainable_state_dict(module)}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="match no module"):
        add_adapters(
            split_model(build_tiny_model("llama")).part("body"),
            AdapterSpec(target_modules=["nope_proj"]),
            seed=0,
        )
    with pytest.raises(ValidationError):
        AdapterSpec(r=0)
    with pytest.raises(ValidationError):
        AdapterSpec(parts=["front", "front"])


def test_state_dict_round_trip_and_strict_errors() -> None:
    def fresh():  # type: ignore[no-untyped-def]
        return add_adapters(split_model(build_tiny_model("llama")).part("back"), AdapterSpec(), seed=0)

    source, target = fresh(), fresh()
    state = {k: torch.randn_like(v) for k, v in trainable_state_dict(source).items()}
    load_trainable_state_dict(target, state)
    assert all(torch.equal(v, state[k]) for k, v in trainable_state_dict(target).items())
    missing = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state_dict(target, missing)
    with pytest.raises(ValueError, match="unexpected"):
        load_trainable_state_dict(target, {**state, "extra.weight": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_trainable_state_dict(target, {**state, key: torch.zeros(3, 3)})


def test_fedavg_weights_and_errors() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    averaged = fedavg([a, b], [1.0, 3.0])
    assert torch.allclose(averaged["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(averaged["b"], torch.tensor([3.0]))
    assert averaged["w"].dtype == torch.float32
    assert torch.equal(fedavg([a], [2.0])["w"], a["w"])
    with pytest.raises(ValueError, match="different keys"):
        fedavg([a, {"w": b["w"]}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fedavg([a, {**b, "w": torch.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="2 state dicts but 1 weights"):
        fedavg([a, b], [1.0])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([a, b], [0.0, 0.0])
    with pytest.raises(ValueError, match="at least one"):
        fedavg([], [])


def test_ptuning_v2_wire_cost_matches_the_paper_at_chatglm_6b_scale() -> None:
    chatglm_6b = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=28)
    # The official code sends a prefix for 27 layers, 128 prefix tokens, fp16: 56.6 MB per sample.
    assert ptuning_v2_wire_bytes_per_sample(chatglm_6b, prefixed_layers=27, pre_seq_len=128) == 56_623_104
    # With our default plan the server holds 26 layers of 28.
    body_layers = len(SplitPlan().body_range(28))
    assert ptuning_v2_wire_bytes_per_sample(chatglm_6b, body_layers) == 26 * 2 * 128 * 4096 * 2
    smollm2 = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    assert ptuning_v2_wire_bytes_per_sample(smollm2, 28, pre_seq_len=16) == 28 * 2 * 16 * 3 * 64 * 2
    with pytest.raises(ValueError, match="pre_seq_len"):
        ptuning_v2_wire_bytes_per_sample(smollm2, 28, pre_seq_len=0)
