"""Export: the split job's adapters as a PEFT dir (and merged weights) give the split model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flglm.adapters import AdapterSpec, add_split_adapters, trainable_state_dict
from flglm.export import MERGED_DIRNAME, export_peft_adapter
from flglm.models import load_model
from flglm.split import SplitModel, SplitPlan, position_ids_from_attention_mask, split_model
from tests.support.padded_batches import padded_batch


def randomised_split_job(
    ref: str, plan: SplitPlan, cfg: AdapterSpec
) -> tuple[SplitModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A split with non-zero adapters in every part (LoRA B starts at zero: would hide a mapping bug)."""
    split = add_split_adapters(split_model(load_model(ref), plan), cfg, seed=3)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in split.as_module_dict().parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    front_back = trainable_state_dict(split.as_module_dict(["front", "back"]))
    body = trainable_state_dict(split.part("body"))
    return split, front_back, body


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_adapter_and_merged_model_match_split_logits(arch: str, tmp_path: Path) -> None:
    ref, plan, cfg = f"tiny:{arch}", SplitPlan(front_layers=1, back_layers=1), AdapterSpec(r=4)
    split, front_back, body = randomised_split_job(ref, plan, cfg)
    assert front_back and body
    batch = padded_batch("left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = split(ids, mask)  # (batch, seq, vocab)

    out = export_peft_adapter(ref, plan, cfg, front_back, body, tmp_path / "export", merge=True)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == len(front_back) + len(body)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in saved)

    peft_model = PeftModel.from_pretrained(load_model(ref), str(out)).eval()
    positions = position_ids_from_attention_mask(mask, ids.shape[1])
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        base_logits = load_model(ref)(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (base_logits - expected)[real].abs().max() > 1e-2  # the adapters change the output at all
    assert torch.allclose(peft_logits[real], expected[real], atol=1e-5)

    merged = AutoModelForCausalLM.from_pretrained(str(out / MERGED_DIRNAME)).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(merged_logits[real], expected[real], atol=1e-4)
    assert (out / MERGED_DIRNAME / "tokenizer.json").is_file()


def test_export_rejects_state_of_another_plan(tmp_path: Path) -> None:
    cfg = AdapterSpec(r=2)
    _, front_back, body = randomised_split_job("tiny:llama", SplitPlan(1, 1), cfg)
    with pytest.raises(ValueError, match="adapter state does not match"):
        export_peft_adapter("tiny:llama", SplitPlan(2, 1), cfg, front_back, body, tmp_path)


@pytest.mark.slow
def test_smollm2_export_loads_offline_with_auto_peft(tmp_path: Path) -> None:
    """The adapter config names the cached base directory, so AutoPeftModel needs nothing but the export."""
    from peft import AutoPeftModelForCausalLM

    cfg = AdapterSpec(r=2, target_modules=["q_proj", "v_proj"])
    split, front_back, body = randomised_split_job("smollm2-135m", SplitPlan(2, 2), cfg)
    out = export_peft_adapter("smollm2-135m", SplitPlan(2, 2), cfg, front_back, body, tmp_path)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])  # (batch, seq)
    model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, split(ids), atol=1e-4)
