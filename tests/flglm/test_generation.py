"""Generation through the split with per-part KV caches equals the unsplit model's greedy `generate`."""

from __future__ import annotations

import pytest
import torch

from flglm.adapters import AdapterSpec, add_split_adapters
from flglm.generation import SamplingConfig, generate_through_split
from flglm.models import load_model
from flglm.split import SplitPlan, split_model
from flglm.tiny_models import EOS_TOKEN_ID, PAD_TOKEN_ID, TINY_VOCAB_SIZE


def prompts(left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, TINY_VOCAB_SIZE, (3, 7), generator=generator)  # (batch, seq)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :3] = 0
        mask[1, :1] = 0
    return ids.masked_fill(mask == 0, PAD_TOKEN_ID), mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("with_adapters", [False, True])
@pytest.mark.parametrize("left_pad", [False, True])
def test_greedy_split_generation_equals_unsplit_generate(
    arch: str, with_adapters: bool, left_pad: bool
) -> None:
    model = load_model(f"tiny:{arch}").eval()
    split = split_model(model, SplitPlan(front_layers=1, back_layers=1))
    if with_adapters:  # random non-zero LoRA in every part, shared with `model` through the split
        add_split_adapters(split, AdapterSpec(r=4), seed=0)
        with torch.no_grad():
            for parameter in split.as_module_dict().parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 0.3)
    ids, mask = prompts(left_pad)
    new = 12
    expected = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    got = generate_through_split(
        split,
        ids,
        mask,
        SamplingConfig(max_new_tokens=new),
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    assert got.shape[1] > ids.shape[1]
    assert torch.equal(got, expected)


def test_sampling_is_seeded() -> None:
    split = split_model(load_model("tiny:llama"), SplitPlan(1, 1))
    ids, mask = prompts(left_pad=True)
    sampling = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50, seed=4)
    first = generate_through_split(split, ids, mask, sampling)
    assert torch.equal(first, generate_through_split(split, ids, mask, sampling))
    other = generate_through_split(split, ids, mask, SamplingConfig(6, True, 1.5, 50, seed=5))
    assert not torch.equal(first, other)


def test_right_padded_prompts_are_refused() -> None:
    split = split_model(load_model("tiny:llama"), SplitPlan(1, 1))
    ids, mask = prompts(left_pad=True)
    with pytest.raises(ValueError, match="left-padded"):
        generate_through_split(split, ids, mask.flip(1))


@pytest.mark.slow
def test_smollm2_split_generation_equals_generate() -> None:
    """The bundled real model (30 layers, grouped-query attention), a left-padded batch, 8 greedy tokens."""
    from flglm.models import load_tokenizer

    model = load_model("smollm2-135m").eval()
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["The capital of France is", "Once upon a time, in a small"], return_tensors="pt", padding=True
    )
    expected = model.generate(  # type: ignore[operator]
        **batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    split = split_model(model, SplitPlan(front_layers=2, back_layers=2))
    got = generate_through_split(
        split,
        batch["input_ids"],
        batch["attention_mask"],
        SamplingConfig(max_new_tokens=8),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    assert torch.equal(got, expected)
