"""Per-round local evaluation on a bounded eval set: eval loss, plus accuracy (classification) or ROUGE-L.

Everything goes through a `score_fn(input_ids, attention_mask) -> logits` (`flglm.evaluation.ScoreFn`), so
the agent evaluates the split model through the server (`flglm.agent_step.remote_score_fn`) with the same
code that scores an unsplit model. Generation is greedy decoding with one full forward per new token: the
server keeps no KV cache between eval forwards, so `max_new_tokens` and `max_examples` bound the cost.
Only aggregate numbers come out (`eval_examples` is the n behind them); predictions stay here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flglm.data import Example, TokenizedExample, collate, encode_prompt_and_completion, tokenize_examples
from flglm.evaluation import (
    ScoreFn,
    classification_pair_rows,
    eval_loss,
    logits_at,
    mean_rouge_l,
    score_label_pairs,
)

DEFAULT_EVAL_EXAMPLES = 32
DEFAULT_MAX_NEW_TOKENS = 16


@torch.no_grad()
def greedy_completions(
    score_fn: ScoreFn,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
) -> list[list[int]]:
    """Greedy new tokens of each prompt (one batch, right padded, a full forward per token; rows stop at
    eos, which is not returned)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = [list(prompt) for prompt in prompts]
    if not rows or any(not row for row in rows):
        raise ValueError("greedy decoding needs at least one non-empty prompt per row")
    new: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    for _ in range(max_new_tokens):
        batch = collate([TokenizedExample(row, row) for row in rows], pad_token_id, padding_side="right")
        last = torch.zeros_like(batch["input_ids"], dtype=torch.bool)  # (batch, seq)
        last[torch.arange(len(rows)), torch.tensor([len(row) - 1 for row in rows])] = True  # each row's last
        logits = logits_at(score_fn, batch["input_ids"], batch["attention_mask"], last)  # (batch, vocab)
        chosen = logits.argmax(dim=-1).tolist()  # (batch,)
        for index, token in enumerate(chosen):
            if finished[index]:
                continue
            if eos_token_id is not None and token == eos_token_id:
                finished[index] = True
                continue
            rows[index].append(int(token))
            new[index].append(int(token))
        if all(finished):
            break
    return new


def generation_rouge_l(
    score_fn: ScoreFn,
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    pad_token_id: int = 0,
) -> float:
    """Mean ROUGE-L F1 of greedy completions against the reference completions."""
    prompt_budget = max(1, max_length - max_new_tokens)  # prompt + new tokens stay within the job's limit
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = []
        for ex in chunk:
            ids, completion_start, _ = encode_prompt_and_completion(tokenizer, ex, ex.completion, max_length)
            prompts.append(ids[:completion_start][:prompt_budget])  # tokenised exactly as in training
        generated = greedy_completions(
            score_fn, prompts, max_new_tokens, tokenizer.eos_token_id, pad_token_id
        )
        predictions += [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return mean_rouge_l(predictions, [ex.completion for ex in examples])


@dataclass(frozen=True)
class ClassificationEval:
    """A classification eval set tokenised once, so scoring it each round needs no tokenizer (an agent then
    drops its tokenizer after preparing its data: SmolLM2's held 30-45 MiB)."""

    loss_rows: list[TokenizedExample]  # each example with its own label's completion: the eval loss
    pair_rows: list[TokenizedExample]  # every (example, label) pair: the accuracy
    gold: list[str]
    labels: list[str]


def prepare_classification_eval(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_length: int,
    label_set: Sequence[str] | None = None,
    max_examples: int = DEFAULT_EVAL_EXAMPLES,
) -> ClassificationEval | None:
    """The first `max_examples` examples tokenised for `classification_eval_metrics`; None when empty."""
    chosen = list(examples[:max_examples])
    if not chosen:
        return None
    labels = list(label_set) if label_set else sorted({str(ex.label) for ex in chosen})
    return ClassificationEval(
        loss_rows=list(tokenize_examples(chosen, tokenizer, max_length).examples),
        pair_rows=classification_pair_rows(chosen, labels, tokenizer, max_length),
        gold=[str(ex.label) for ex in chosen],
        labels=labels,
    )


def loss_metrics(
    score_fn: ScoreFn, rows: Sequence[TokenizedExample], batch_size: int, pad_token_id: int
) -> dict[str, float]:
    """eval_loss over `rows` in batches of `batch_size`, and eval_examples (their count)."""
    batches = [collate(rows[i : i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]
    return {"eval_loss": eval_loss(score_fn, batches), "eval_examples": float(len(rows))}


def classification_eval_metrics(
    score_fn: ScoreFn, prepared: ClassificationEval, *, batch_size: int, pad_token_id: int
) -> dict[str, float]:
    """eval_loss, eval_examples and accuracy (with its 95 % interval) of a prepared eval set."""
    metrics = loss_metrics(score_fn, prepared.loss_rows, batch_size, pad_token_id)
    result = score_label_pairs(
        score_fn, prepared.pair_rows, prepared.gold, prepared.labels, batch_size, pad_token_id
    )
    return metrics | result.as_metrics()


def round_eval_metrics(
    score_fn: ScoreFn,
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    task: str,
    max_length: int,
    batch_size: int,
    pad_token_id: int,
    label_set: Sequence[str] | None = None,
    max_examples: int = DEFAULT_EVAL_EXAMPLES,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, float]:
    """eval_loss and eval_examples, plus accuracy (with its 95 % interval) for classification or rouge_l for
    generation, on the first `max_examples` examples; {} when there is nothing to evaluate."""
    if task == "classification":
        prepared = prepare_classification_eval(
            examples, tokenizer, max_length=max_length, label_set=label_set, max_examples=max_examples
        )
        if prepared is None:
            return {}
        return classification_eval_metrics(
            score_fn, prepared, batch_size=batch_size, pad_token_id=pad_token_id
        )
    chosen = list(examples[:max_examples])
    if not chosen:
        return {}
    rows = tokenize_examples(chosen, tokenizer, max_length).examples
    metrics = loss_metrics(score_fn, rows, batch_size, pad_token_id)
    metrics["rouge_l"] = generation_rouge_l(
        score_fn, chosen, tokenizer, max_length, batch_size, max_new_tokens, pad_token_id
    )
    return metrics
