"""Split training equals centralized training step for step; the two sides behave as the wire needs."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from flglm.adapters import AdapterSpec, add_split_adapters, trainable_state_dict
from flglm.split import PartName, SplitPlan, position_ids_from_attention_mask, split_model
from flglm.tiny_models import TINY_ARCHITECTURES, TINY_CORPUS, build_tiny_model
from flglm.trainers import (
    CentralizedTrainer,
    ClientSideTrainer,
    ServerSideTrainer,
    SplitTrainer,
    StepGraphMissing,
    TrainConfig,
    _lr_factor,
    causal_lm_loss,
    target_positions,
    target_token_mask,
    tokenize_lm_batch,
)

STEPS = 20


def text_batches(tokenizer, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Real text, alternating left and right padding, prompt tokens masked out on odd steps."""
    batches = []
    for step in range(steps):
        texts = [TINY_CORPUS[(step + j) % len(TINY_CORPUS)] for j in range(3)]
        batch = tokenize_lm_batch(
            tokenizer, texts, max_length=20, padding_side="left" if step % 2 else "right"
        )
        if step % 3 == 0:  # score only a completion: the first real tokens are prompt
            batch["labels"] = batch["labels"].clone()
            batch["labels"][:, :6] = -100
        batches.append(batch)
    return batches


def paired_trainers(arch: str, adapters: AdapterSpec, cfg: TrainConfig, plan: SplitPlan = SplitPlan()):  # type: ignore[no-untyped-def]
    """A centralized and a split trainer on two copies of one model with the same initial adapters."""
    model = build_tiny_model(arch, seed=11)
    add_split_adapters(split_model(model, plan), adapters, seed=13)  # shared modules: the model sees them
    return CentralizedTrainer(copy.deepcopy(model), cfg), SplitTrainer(
        split_model(copy.deepcopy(model), plan), cfg
    )


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_split_lora_training_matches_centralized(arch: str, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(lr=5e-3, warmup_steps=3, total_steps=STEPS, weight_decay=0.01)
    central, split = paired_trainers(arch, AdapterSpec(r=4), cfg)
    batches = text_batches(tiny_tokenizer)
    central_losses = [central.train_step(b) for b in batches]
    split_losses = [split.train_step(b) for b in batches]
    assert max(abs(a - b) for a, b in zip(central_losses, split_losses, strict=True)) <= 1e-4
    # Training did something (the first batch scores lower now) and the adapters moved off their init.
    assert central.train_step(batches[0]) < central_losses[0]
    final_front = trainable_state_dict(split.client.front)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in final_front.items())
    assert split.server.pending_steps == []  # every graph was used and released


@pytest.mark.parametrize("parts", [["body"], ["front", "back"], ["back"]])
def test_adapters_on_some_parts_only(parts: list[PartName], tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(lr=5e-3, score_only_targets=False)
    central, split = paired_trainers("llama", AdapterSpec(parts=parts), cfg, SplitPlan(1, 2))
    batches = text_batches(tiny_tokenizer, steps=4)
    for batch in batches:
        assert abs(central.train_step(batch) - split.train_step(batch)) <= 1e-4


def test_bf16_autocast_runs_and_stays_close(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(lr=5e-3, bf16_autocast=True)
    central, split = paired_trainers("llama", AdapterSpec(), cfg)
    for batch in text_batches(tiny_tokenizer, steps=3):
        central_loss, split_loss = central.train_step(batch), split.train_step(batch)
        assert torch.isfinite(torch.tensor(split_loss))
        assert abs(central_loss - split_loss) <= 5e-2


def test_loss_equals_hf_and_target_positions_give_the_same_loss(make_batch) -> None:  # type: ignore[no-untyped-def]
    model = build_tiny_model("llama")
    batch = make_batch("left")
    batch["labels"][:, :7] = -100
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    positions_ids = position_ids_from_attention_mask(mask, ids.shape[1])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions_ids, labels=labels)
        ours = causal_lm_loss(out.logits, labels)
        positions = target_positions(labels)
        kept = model(input_ids=ids, attention_mask=mask, position_ids=positions_ids, logits_to_keep=positions)
        ours_kept = causal_lm_loss(kept.logits, labels, positions)
    assert positions.tolist() == list(range(6, 11))
    assert abs(ours.item() - out.loss.item()) <= 1e-6
    assert abs(ours_kept.item() - ours.item()) <= 1e-6
    # The client's back computes the head at the scored tokens only (a (batch, seq) mask): same loss.
    parts = split_model(model)
    token_mask = target_token_mask(labels)
    with torch.no_grad():
        h = parts.part("body")(parts.part("front")(ids, mask), mask)
        scored = parts.part("back")(h, mask, logits_to_keep=token_mask)  # (n_scored, vocab)
    assert scored.shape == (int((labels[:, 1:] != -100).sum()), model.config.vocab_size)
    assert abs(causal_lm_loss(scored, labels, token_mask).item() - out.loss.item()) <= 1e-5
    with pytest.raises(ValueError, match="no target tokens"):
        causal_lm_loss(out.logits, torch.full_like(labels, -100))


def test_server_graphs_are_keyed_bounded_and_single_use(make_batch) -> None:  # type: ignore[no-untyped-def]
    parts = split_model(build_tiny_model("llama"))
    server = ServerSideTrainer(parts.part("body"), TrainConfig(), max_pending_graphs=2)
    batch = make_batch("right")
    h0 = parts.part("front")(batch["input_ids"], batch["attention_mask"]).detach()
    for key in ("a", "b", "c"):
        h1 = server.forward(key, h0, batch["attention_mask"])
        assert not h1.requires_grad and h1.shape == h0.shape
    assert server.pending_steps == ["b", "c"]  # "a" evicted
    with pytest.raises(StepGraphMissing, match="'a'"):
        server.backward("a", torch.ones_like(h0))
    grad_h0 = server.backward("c", torch.ones_like(h0))
    assert grad_h0.shape == h0.shape and grad_h0.abs().sum() > 0
    with pytest.raises(StepGraphMissing):
        server.backward("c", torch.ones_like(h0))
    server.drop("b")
    assert server.pending_steps == []


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(warmup_steps=2, total_steps=6)
    assert [_lr_factor(s, cfg) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert _lr_factor(100, TrainConfig()) == 1.0


def test_tokenized_batch_masks_padding_in_labels(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    batch = tokenize_lm_batch(tiny_tokenizer, ["short", "a much longer sentence here"], 16, "left")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert torch.equal(
        batch["labels"][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1]
    )


def test_sides_accept_bf16_activations_from_the_wire(make_batch) -> None:  # type: ignore[no-untyped-def]
    parts = add_split_adapters(split_model(build_tiny_model("llama")), AdapterSpec(), seed=0)
    split = SplitTrainer(parts, TrainConfig())
    batch = make_batch("right")
    h0 = split.client.forward_front(batch)
    h1 = split.server.forward("s", h0.to(torch.bfloat16), batch["attention_mask"])
    assert h1.dtype == torch.float32  # the body computes in its own dtype
    loss = split.client.forward_back(h1.to(torch.bfloat16), batch)
    grad_h0 = split.server.backward("s", split.client.backward_back().to(torch.bfloat16))
    split.client.backward_front(grad_h0.to(torch.bfloat16))
    assert torch.isfinite(loss) and grad_h0.dtype == torch.float32
    assert all(p.grad is not None for p in split.client.optimizer.params)


def _count_bytes(saved: list[int], tensor: torch.Tensor) -> torch.Tensor:
    saved.append(tensor.numel() * tensor.element_size())
    return tensor


def test_recomputing_the_front_gives_the_same_step_and_keeps_only_its_inputs(make_batch) -> None:  # type: ignore[no-untyped-def]
    """An agent's `recompute_front`: the same h0, loss and gradients (LoRA dropout on, so the recomputation
    must replay its masks), while the graph kept through the server's turn holds the block's inputs only."""
    parts = add_split_adapters(split_model(build_tiny_model("llama")), AdapterSpec(dropout=0.2), seed=0)
    batch = make_batch("right")
    outcomes = []
    for recompute in (False, True):
        split = copy.deepcopy(parts)
        client = ClientSideTrainer(split, TrainConfig(), recompute_front=recompute)
        server = ServerSideTrainer(split.part("body"), TrainConfig())
        saved: list[int] = []
        torch.manual_seed(7)
        with torch.autograd.graph.saved_tensors_hooks(partial(_count_bytes, saved), lambda tensor: tensor):
            h0 = client.forward_front(batch)
        h1 = server.forward("s", h0, batch["attention_mask"])
        loss = client.forward_back(h1, batch)
        client.backward_front(server.backward("s", client.backward_back()))
        grads = {id_: p.grad.clone() for id_, p in enumerate(client.optimizer.params)}
        outcomes.append((h0, float(loss.detach()), grads, sum(saved)))
    (h0, loss, grads, kept), (h0_again, loss_again, grads_again, kept_again) = outcomes
    assert torch.equal(h0, h0_again) and loss == loss_again
    assert grads.keys() == grads_again.keys() and all(torch.equal(grads[k], grads_again[k]) for k in grads)
    assert kept_again * 5 < kept, (kept_again, kept)
