"""ROUGE-L, the Wilson interval, eval loss and label-scoring accuracy with a tiny real Llama."""

from __future__ import annotations

import math

import pytest
import torch

from flglm.data import classification_example, collate, iterate_batches, tokenize_examples
from flglm.evaluation import (
    classification_accuracy,
    completion_log_probs,
    eval_loss,
    mean_rouge_l,
    rouge_l,
    scores_positions,
    wilson_interval,
)
from flglm.split import SplitPlan, split_model
from flglm.tiny_models import build_tiny_model, train_tiny_tokenizer

LABELS = ["sport", "weather", "health"]
TEXTS = {
    "sport": "The team won the championship after a dramatic final match",
    "weather": "Heavy rain and strong winds expected across the northern region",
    "health": "Officials urged people to get vaccinated before the flu season",
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def examples():
    return [classification_example(TEXTS[label], label) for label in LABELS for _ in range(2)]


# --------------------------------------------------------------------------------------------------- ROUGE-L


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat on the mat", 10 / 11),  # LCS 5: P=5/6, R=1
        ("a b c d", "a c e", 4 / 7),  # LCS 2: P=1/2, R=2/3
        ("The Cat", "the cat", 1.0),  # lower-cased by default
        ("x y z", "a b c", 0.0),
        ("", "a b", 0.0),
        ("b a", "a b", 0.5),  # order matters: LCS 1
    ],
)
def test_rouge_l_known_values(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_case_sensitive_and_mean() -> None:
    assert rouge_l("The Cat", "the cat", lowercase=False) == 0.0
    assert mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        mean_rouge_l(["a", "b"], ["a"])


# --------------------------------------------------------------------------------------------------- Wilson


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(128, 400)  # 32 % on 400 examples: about +-4.6 points
    assert (low, high) == (pytest.approx(0.2762, abs=1e-4), pytest.approx(0.3672, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for total in range(1, 300):  # the interval always holds the estimate, even all-or-nothing ones
        assert wilson_interval(total, total)[1] == 1.0 and wilson_interval(0, total)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


# ------------------------------------------------------------------------------------------------ eval loss


def test_eval_loss_matches_hf_loss_and_is_token_weighted(tokenizer, examples) -> None:
    model = build_tiny_model("llama", seed=0)
    rows = tokenize_examples(examples, tokenizer, max_length=64).examples
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        hf_loss = model(**batch).loss.item()  # one batch: HF's token mean is ours
    assert eval_loss(model, [batch]) == pytest.approx(hf_loss, rel=1e-5)
    # Two uneven batches still give the token-weighted mean over everything, not a mean of batch means.
    split = [collate(rows[:1], tokenizer.pad_token_id), collate(rows[1:], tokenizer.pad_token_id, "left")]
    assert eval_loss(model, split) == pytest.approx(hf_loss, rel=1e-5)


def test_completion_log_probs_counts_scored_tokens() -> None:
    logits = torch.zeros(1, 4, 5)  # uniform: every scored token costs log(5)
    labels = torch.tensor([[-100, -100, 3, 1]])
    sums, counts = completion_log_probs(logits, labels)
    assert counts.tolist() == [2] and sums.item() == pytest.approx(-2 * math.log(5))


# -------------------------------------------------------------------------------------------- accuracy


def _brute_force_scores(model, tokenizer, example) -> list[float]:
    """Each label scored alone, unbatched and unpadded, straight from log_softmax."""
    scores = []
    for label in LABELS:
        prompt = tokenizer(example.full_prompt)["input_ids"]
        target = tokenizer(f" {label}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)  # (seq, vocab)
        scores.append(sum(log_probs[len(prompt) + i - 1, t].item() for i, t in enumerate(target)))
    return scores


def test_label_scores_match_unbatched_computation(tokenizer, examples) -> None:
    model = build_tiny_model("llama", seed=1)
    result = classification_accuracy(model, examples, LABELS, tokenizer, pairs_per_batch=4)
    for example, scores in zip(examples, result.scores, strict=True):
        assert scores == pytest.approx(_brute_force_scores(model, tokenizer, example), abs=1e-4)
    one_by_one = classification_accuracy(model, examples, LABELS, tokenizer, pairs_per_batch=1)
    # padding never changes a score
    assert torch.allclose(torch.tensor(one_by_one.scores), torch.tensor(result.scores), atol=1e-4)
    assert result.predictions == [LABELS[max(range(3), key=s.__getitem__)] for s in result.scores]
    assert result.total == 6 and sum(result.predicted_counts.values()) == 6
    assert result.correct == sum(p == e.label for p, e in zip(result.predictions, examples, strict=True))


def test_trained_tiny_model_gets_every_label_right_split_or_not(tokenizer, examples) -> None:
    torch.manual_seed(0)
    model = build_tiny_model("llama", seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = tokenize_examples(examples, tokenizer, max_length=64)
    batches = iterate_batches(rows, batch_size=6, seed=0)
    before = classification_accuracy(model.eval(), examples, LABELS, tokenizer)
    model.train()
    for _ in range(40):
        loss = model(**collate(next(batches), tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = classification_accuracy(model, examples, LABELS, tokenizer)
    assert after.accuracy == 1.0 and after.correct == 6
    assert {label: c.correct for label, c in after.per_label.items()} == dict.fromkeys(LABELS, 2)
    assert after.interval[0] > 0.5 and after.interval[1] == 1.0
    assert before.accuracy < 1.0  # the random model did not already know
    assert after.as_metrics()["accuracy"] == 1.0

    parts = split_model(model, SplitPlan(front_layers=1, back_layers=1))

    def split_score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = parts.part("front")(input_ids, attention_mask)  # (batch, seq, hidden)
        hidden = parts.part("body")(hidden, attention_mask)  # (batch, seq, hidden)
        return parts.part("back")(hidden, attention_mask)  # (batch, seq, vocab)

    split_result = classification_accuracy(split_score, examples, LABELS, tokenizer)
    assert split_result.predictions == after.predictions
    assert torch.allclose(torch.tensor(split_result.scores), torch.tensor(after.scores), atol=1e-4)


def test_accuracy_rejects_unknown_labels(tokenizer) -> None:
    model = build_tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="'other' is not in the label set"):
        classification_accuracy(model, [classification_example("x", "other")], LABELS, tokenizer)


def test_a_position_scorer_asks_only_for_scored_positions_and_scores_the_same(tokenizer, examples) -> None:
    """A score function marked `scores_positions` (the agent's remote one) computes the head at the scored
    positions only (an eval batch of SmolLM2 no longer holds (batch, seq, 49k) logits): same loss and label
    scores as from the full logits."""
    model = build_tiny_model("llama", seed=2).eval()
    asked: list[tuple[int, int, int]] = []  # (tokens scored, rows, positions) per call

    @scores_positions
    def by_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        asked.append((int(positions.sum()), *input_ids.shape))
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.lm_head(hidden[positions])  # (n_kept, vocab): the head at the masked tokens only

    full = classification_accuracy(model, examples, LABELS, tokenizer, pairs_per_batch=4)
    kept = classification_accuracy(by_positions, examples, LABELS, tokenizer, pairs_per_batch=4)
    assert torch.allclose(torch.tensor(kept.scores), torch.tensor(full.scores), atol=1e-5)
    # Only each row's own scored tokens (its label's few), far from every position.
    assert asked and all(4 * n < rows * (seq - 1) for n, rows, seq in asked), asked
    rows = tokenize_examples(examples, tokenizer, max_length=64).examples
    batches = [collate(rows[:3], tokenizer.pad_token_id), collate(rows[3:], tokenizer.pad_token_id, "left")]
    assert eval_loss(by_positions, batches) == pytest.approx(eval_loss(model, batches), rel=1e-6)
