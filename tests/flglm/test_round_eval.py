"""Per-round eval metrics on a score function: greedy decoding equals `generate`, metrics per task, bounds."""

from __future__ import annotations

import pytest
import torch

from flglm.contracts.disclosures import ROUND_METRICS
from flglm.data import classification_example, generation_example
from flglm.models import load_tokenizer
from flglm.round_eval import greedy_completions, round_eval_metrics
from flglm.split import position_ids_from_attention_mask
from flglm.tiny_models import build_tiny_model

MODEL_REF = "tiny:llama:0"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_tiny_model("llama", 0)


def score_fn(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = position_ids_from_attention_mask(attention_mask, input_ids.shape[1])
        with torch.no_grad():
            return model(  # type: ignore[no-any-return]
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
            ).logits  # (batch, seq, vocab)

    return score


def test_greedy_completions_equal_generate_row_by_row(model: torch.nn.Module) -> None:
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [42]]  # different lengths: the batch is right padded
    got = greedy_completions(score_fn(model), prompts, max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    for prompt, new in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        out = model.generate(  # type: ignore[operator]
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        assert new == out[0, len(prompt) :].tolist()
    # A row stops at eos (not returned) while the others go on.
    eos = got[0][2]
    stopped = greedy_completions(
        score_fn(model), prompts[:1], max_new_tokens=5, eos_token_id=eos, pad_token_id=0
    )
    assert stopped == [got[0][:2]]
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_completions(score_fn(model), prompts, max_new_tokens=0, eos_token_id=None, pad_token_id=0)


def test_round_eval_metrics_per_task_and_bounded(model: torch.nn.Module) -> None:
    tokenizer = load_tokenizer(MODEL_REF)
    calls: list[tuple[int, int]] = []

    def counting(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(input_ids.shape))  # type: ignore[arg-type]
        return score_fn(model)(input_ids, attention_mask)  # type: ignore[no-any-return]

    labels = ["marmalade", "tangerine"]
    examples = [classification_example(f"walrus fjord {i}", labels[i % 2]) for i in range(5)]
    metrics = round_eval_metrics(
        counting, examples, tokenizer, task="classification", max_length=32, batch_size=4,
        pad_token_id=0, label_set=labels, max_examples=3,
    )  # fmt: skip
    assert set(metrics) == {"eval_loss", "eval_examples", "accuracy", "accuracy_ci_low", "accuracy_ci_high"}
    assert metrics["eval_examples"] == 3 and 0 <= metrics["accuracy"] <= 1 and metrics["eval_loss"] > 0
    classification = metrics
    assert [rows for rows, _ in calls] == [3, 4, 2]  # 3 loss rows, then 3 x 2 (example, label) rows
    assert all(rows <= 4 for rows, _ in calls)

    calls.clear()
    prompts = [generation_example("the walrus sat on the", " cobalt fjord"), generation_example("hi", " you")]
    metrics = round_eval_metrics(
        counting, prompts, tokenizer, task="generation", max_length=32, batch_size=2, pad_token_id=0,
        max_new_tokens=3,
    )  # fmt: skip
    assert set(metrics) == {"eval_loss", "eval_examples", "rouge_l"} and 0 <= metrics["rouge_l"] <= 1
    assert set(metrics) | set(classification) <= set(ROUND_METRICS)  # the consent text lists them all
    assert 2 <= len(calls) <= 1 + 3  # one loss batch, at most max_new_tokens decoding forwards
    nothing = round_eval_metrics(
        counting, [], tokenizer, task="generation", max_length=32, batch_size=2, pad_token_id=0
    )
    assert nothing == {}


def test_a_prepared_classification_eval_scores_like_the_tokenizer_path(model: torch.nn.Module) -> None:
    """An agent tokenises its held-out set once and drops the tokenizer: the metrics equal eval_loss and
    classification_accuracy computed from the examples with the tokenizer."""
    from flglm.data import collate, tokenize_examples
    from flglm.evaluation import classification_accuracy, eval_loss
    from flglm.round_eval import classification_eval_metrics, prepare_classification_eval

    tokenizer = load_tokenizer(MODEL_REF)
    labels = ["marmalade", "tangerine", "obsidian"]
    examples = [classification_example(f"walrus fjord harbour {i}", labels[i % 3]) for i in range(7)]
    prepared = prepare_classification_eval(
        examples, tokenizer, max_length=32, label_set=labels, max_examples=6
    )
    assert prepared is not None and prepared.gold == [str(ex.label) for ex in examples[:6]]
    metrics = classification_eval_metrics(score_fn(model), prepared, batch_size=4, pad_token_id=0)
    rows = tokenize_examples(examples[:6], tokenizer, 32).examples
    loss = eval_loss(score_fn(model), [collate(rows[:4], 0), collate(rows[4:], 0)])
    accuracy = classification_accuracy(
        score_fn(model), examples[:6], labels, tokenizer, max_length=32, pairs_per_batch=4, pad_token_id=0
    )
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics["accuracy"] == accuracy.accuracy and metrics["eval_examples"] == 6
    assert prepare_classification_eval([], tokenizer, max_length=32) is None
