"""The split model equals the unsplit one: logits and gradients, every architecture, every padding side."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertModel, T5Config, T5ForConditionalGeneration

from flglm.split import SplitPlan, position_ids_from_attention_mask, split_model
from flglm.tiny_models import TINY_ARCHITECTURES, build_tiny_model, tiny_config
from flglm.trainers import causal_lm_loss
from tests.support.padded_batches import PADDINGS


def unsplit_logits(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs: object) -> torch.Tensor:
    """The reference: the whole model, given the same position ids the parts derive from the mask."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = position_ids_from_attention_mask(mask, ids.shape[1])
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs).logits


def split_chain_loss(parts, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Front → body → back with the graph cut at both boundaries, as on the wire, then backward."""
    mask = batch["attention_mask"]
    h0 = parts.part("front")(batch["input_ids"], mask)
    h0_server = h0.detach().requires_grad_(True)
    h1 = parts.part("body")(h0_server, mask)
    h1_client = h1.detach().requires_grad_(True)
    loss = causal_lm_loss(parts.part("back")(h1_client, mask), batch["labels"])
    loss.backward()
    h1.backward(h1_client.grad)
    h0.backward(h0_server.grad)
    return loss


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_split_logits_equal_unsplit(arch: str, padding: str, make_batch) -> None:  # type: ignore[no-untyped-def]
    model = build_tiny_model(arch, seed=1)
    batch = make_batch(padding)
    parts = split_model(model, SplitPlan(front_layers=1, back_layers=1))
    with torch.no_grad():
        expected = unsplit_logits(model, batch)  # (batch, seq, vocab)
        h = parts.part("front")(batch["input_ids"], batch["attention_mask"])
        assert h.shape == (*batch["input_ids"].shape, model.config.hidden_size)
        got = parts.part("back")(parts.part("body")(h, batch["attention_mask"]), batch["attention_mask"])
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_without_padding_equals_plain_hf_call(arch: str, make_batch) -> None:  # type: ignore[no-untyped-def]
    model = build_tiny_model(arch, seed=2)
    batch = make_batch("none")
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        got = split_model(model)(batch["input_ids"], batch["attention_mask"])
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_split_gradients_equal_unsplit(arch: str, padding: str, make_batch) -> None:  # type: ignore[no-untyped-def]
    batch = make_batch(padding, seed=3)
    reference = build_tiny_model(arch, seed=4).train()
    loss_ref = causal_lm_loss(unsplit_logits(reference, batch), batch["labels"])
    loss_ref.backward()
    model = build_tiny_model(arch, seed=4).train()
    loss = split_chain_loss(split_model(model), batch)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5
    ref_params = dict(reference.named_parameters())
    compared = 0
    for name, parameter in model.named_parameters():
        expected = ref_params[name].grad
        assert parameter.grad is not None and expected is not None, name
        scale = expected.abs().max().clamp(min=1e-8)
        assert ((parameter.grad - expected).abs().max() / scale).item() <= 1e-5, name
        compared += 1
    assert compared == len(ref_params)


def test_gemma2_softcapping_and_scaling_are_in_the_parts(make_batch) -> None:  # type: ignore[no-untyped-def]
    model = build_tiny_model("gemma2", seed=0)
    parts = split_model(model)
    cap = model.config.final_logit_softcapping
    assert parts.back is not None and parts.back.final_logit_softcapping == cap
    batch = make_batch("left")
    with torch.no_grad():
        logits = parts(batch["input_ids"], batch["attention_mask"])
        embedded = parts.part("front").embed_tokens(batch["input_ids"])  # the scaled embedding module
        raw = nn.functional.embedding(batch["input_ids"], model.model.embed_tokens.weight)
    assert logits.abs().max().item() <= cap
    assert torch.allclose(embedded, raw * model.config.hidden_size**0.5)
    assert parts.back.lm_head.weight is parts.part("front").embed_tokens.weight  # tied, shared, not copied


def test_parts_reuse_the_models_modules() -> None:
    model = build_tiny_model("llama")
    parts = split_model(model, SplitPlan(front_layers=1, back_layers=2))
    assert parts.front is not None and parts.body is not None and parts.back is not None
    assert parts.part("front").embed_tokens is model.model.embed_tokens
    assert list(parts.front.stack.layers) == [model.model.layers[0]]
    assert list(parts.body.stack.layers) == [model.model.layers[1]]
    assert list(parts.back.stack.layers) == list(model.model.layers[2:])
    assert parts.back.norm is model.model.norm and parts.back.lm_head is model.lm_head


def test_mixed_layer_types_follow_the_config() -> None:
    model = build_tiny_model("qwen2")
    parts = split_model(model)
    assert parts.front is not None and parts.back is not None
    assert parts.front.stack.layer_types == ("full_attention",)
    assert parts.back.stack.layer_types == ("sliding_attention",)
    assert (
        split_model(build_tiny_model("mistral")).part("body").stack.layer_types == ("sliding_attention",) * 2
    )


@pytest.mark.parametrize(("front", "back"), [(2, 1), (1, 2), (2, 2)])
def test_configurable_layer_counts(front: int, back: int, make_batch) -> None:  # type: ignore[no-untyped-def]
    model = build_tiny_model("llama", seed=5, num_hidden_layers=5)
    batch = make_batch("left")
    parts = split_model(model, SplitPlan(front_layers=front, back_layers=back))
    assert len(parts.part("body").stack.layers) == 5 - front - back
    with torch.no_grad():
        diff = (parts(batch["input_ids"], batch["attention_mask"]) - unsplit_logits(model, batch)).abs().max()
    assert diff.item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_logits_to_keep_matches_hf(arch: str, make_batch) -> None:  # type: ignore[no-untyped-def]
    model = build_tiny_model(arch)
    batch = make_batch("right")
    parts = split_model(model)
    keep = torch.tensor([1, 4, 7])
    with torch.no_grad():
        h = parts.part("body")(
            parts.part("front")(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]
        )
        for to_keep in (3, keep):
            got = parts.part("back")(h, batch["attention_mask"], logits_to_keep=to_keep)
            expected = unsplit_logits(model, batch, logits_to_keep=to_keep)
            assert got.shape[1] == 3
            assert (got - expected).abs().max().item() <= 1e-5


def test_position_ids_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    positions = position_ids_from_attention_mask(mask, 5)
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert position_ids_from_attention_mask(None, 3).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize(("front", "back", "layers"), [(2, 2, 4), (3, 2, 4), (1, 1, 2)])
def test_plan_that_leaves_the_server_nothing_is_rejected(front: int, back: int, layers: int) -> None:
    model = build_tiny_model("llama", num_hidden_layers=layers)
    with pytest.raises(ValueError) as error:
        split_model(model, SplitPlan(front_layers=front, back_layers=back))
    message = str(error.value)
    assert f"front_layers={front}" in message and f"back_layers={back}" in message
    assert f"has only {layers}" in message


@pytest.mark.parametrize(("front", "back"), [(0, 1), (1, 0), (-1, 2)])
def test_plan_without_client_layers_is_rejected(front: int, back: int) -> None:
    with pytest.raises(ValueError, match=f"front_layers={front}, back_layers={back}"):
        SplitPlan(front_layers=front, back_layers=back)


def test_non_decoder_models_are_rejected() -> None:
    bert = BertModel(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(TypeError, match="BertModel"):
        split_model(bert)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8)
    )
    with pytest.raises(TypeError, match="encoder-decoder"):
        split_model(t5)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        split_model(nn.Linear(4, 4))


def test_unsupported_layer_type_is_rejected() -> None:
    config = tiny_config("qwen2")
    config.layer_types = ["full_attention", "chunked_attention", "full_attention", "full_attention"]
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(TypeError, match="chunked_attention"):
        split_model(model)


def test_missing_part_is_a_clear_error() -> None:
    parts = split_model(build_tiny_model("llama"), parts={"body"})
    assert parts.front is None and parts.back is None
    with pytest.raises(ValueError, match="'front'"):
        parts.part("front")
