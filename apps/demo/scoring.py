"""Label scoring for the demo with one prompt forward per example: the labels continue from a shared KV cache.

`flglm.evaluation.classification_accuracy` runs one full row per (example, label): with 8 labels it pays for
every prompt 8 times. Here each batch of prompts runs once (left-padded, `use_cache=True`), then every label's
few tokens run on a copy of that cache. The scores are the same summed completion log-probabilities (same
tokenisation via `encode_prompt_and_completion`, eos included), so accuracy, the Wilson interval and the
eval loss (mean cross-entropy of the true label's tokens) mean what they mean there; a test checks both agree.
Zero-shot, centralized and federated models all go through this one function.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flglm.data import Example, encode_prompt_and_completion, verbalise_label
from flglm.evaluation import wilson_interval


@dataclass(frozen=True)
class LabelScores:
    """Accuracy with its 95 % Wilson interval and the eval loss on the true labels' tokens."""

    correct: int
    total: int
    interval: tuple[float, float]
    eval_loss: float
    scores: list[list[float]]  # [example][label]: summed completion log-prob
    predicted_counts: dict[str, int]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _encode(
    tokenizer: Any, example: Example, labels: Sequence[str], max_length: int
) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, completion ids per label); the prompt must come out the same for every label."""
    prompt: list[int] | None = None
    completions = []
    for label in labels:
        ids, start, _ = encode_prompt_and_completion(tokenizer, example, verbalise_label(label), max_length)
        if prompt is None:
            prompt = ids[:start]
        elif ids[:start] != prompt:  # a long label cut the prompt differently: raise max_length
            raise ValueError(f"{example.origin or 'example'}: prompt truncation depends on the label")
        completions.append(ids[start:])
    assert prompt is not None
    return prompt, completions


@torch.no_grad()
def score_labels(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    max_length: int = 128,
    batch_size: int = 16,
    bf16_autocast: bool = False,
) -> LabelScores:
    """Score every label of `labels` for every example with `model` (an HF causal LM, adapters included)."""
    labels = list(labels)
    if not labels or not examples:
        raise ValueError("need at least one label and one example to score")
    unknown = {str(ex.label) for ex in examples} - set(labels)
    if unknown:
        raise ValueError(f"eval labels {sorted(unknown)} are not in the label set {labels}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    scores = torch.zeros(len(examples), len(labels))  # (examples, labels)
    true_log_prob, true_tokens = 0.0, 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = [_encode(tokenizer, ex, labels, max_length) for ex in chunk]
        width = max(len(prompt) for prompt, _ in encoded)
        input_ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)  # (batch, prompt)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (batch, prompt)
        for row, (prompt, _) in enumerate(encoded):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (batch, prompt): left padding shifts positions
        with autocast:
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (batch, vocab): the first label token
        next_position = positions[:, -1] + 1  # (batch,)
        for j in range(len(labels)):
            # Rows may tokenise a label differently only through the prompt boundary; group by completion.
            by_completion: dict[tuple[int, ...], list[int]] = {}
            for row, (_, completions) in enumerate(encoded):
                by_completion.setdefault(tuple(completions[j]), []).append(row)
            for completion, rows in by_completion.items():
                index = torch.tensor(rows)
                total = first[index, completion[0]]  # (rows,)
                if len(completion) > 1:
                    rest = torch.tensor(completion, dtype=torch.long).expand(len(rows), -1)  # (rows, L)
                    cache = copy.deepcopy(out.past_key_values)
                    if len(rows) < len(chunk):
                        cache.batch_select_indices(index)
                    cont_mask = torch.cat(
                        [mask[index], torch.ones_like(rest[:, :-1])], dim=1
                    )  # (rows, P+L-1)
                    cont_positions = next_position[index, None] + torch.arange(
                        len(completion) - 1
                    )  # (rows, L-1)
                    with autocast:
                        logits = model(
                            input_ids=rest[:, :-1],
                            attention_mask=cont_mask,
                            position_ids=cont_positions,
                            past_key_values=cache,
                            use_cache=True,
                        ).logits  # (rows, L-1, vocab)
                    log_probs = torch.log_softmax(logits.float(), dim=-1)
                    total = total + log_probs.gather(2, rest[:, 1:, None]).squeeze(2).sum(dim=1)
                scores[start + index, j] = total
        for row, ex in enumerate(chunk):
            j = labels.index(str(ex.label))
            true_log_prob += float(scores[start + row, j])
            true_tokens += len(encoded[row][1][j])
    best = scores.argmax(dim=1).tolist()  # ties go to the earlier label, as in flglm.evaluation
    correct = sum(labels[b] == ex.label for b, ex in zip(best, examples, strict=True))
    predicted = dict.fromkeys(labels, 0)
    for b in best:
        predicted[labels[b]] += 1
    return LabelScores(
        correct=correct,
        total=len(examples),
        interval=wilson_interval(correct, len(examples)),
        eval_loss=-true_log_prob / true_tokens,
        scores=scores.tolist(),
        predicted_counts=predicted,
    )
