"""Local evaluation each round: eval loss, label-scoring accuracy (with a Wilson interval) and ROUGE-L.

Every scorer takes `score_fn(input_ids, attention_mask) -> logits` (batch, seq, vocab), any callable: the
unsplit model, or `lambda ids, mask: back(body(front(ids, mask), mask), mask)` for a split one, so the same
code evaluates centralized and federated runs. A score function marked with `keeps_positions` (see
`scores_positions`) is also asked for the logits of the few (row, position) pairs a scorer reads, given as
a (batch, seq) mask, and returns them as (n_kept, vocab): the agent's remote scorer is, so an eval batch never
holds (batch, seq, vocab) logits (8 rows of 96 tokens of SmolLM2's 49k vocabulary are 151 MB), nor (batch,
kept, vocab) ones for the union of every row's positions (a right-padded batch's targets sit apart).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flglm.data import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    collate,
    encode_prompt_and_completion,
    verbalise_label,
)
from flglm.data.tokens import target_token_mask

ScoreFn = Callable[..., Any]


def _logits(output: Any) -> torch.Tensor:
    """Accept raw logits or an HF ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output.logits


def scores_positions(score_fn: ScoreFn) -> ScoreFn:
    """Mark `score_fn` as taking `positions=` (a (batch, seq) bool mask) and returning only the logits there,
    (n_kept, vocab) in row-major order (`ClientBack`'s `logits_to_keep` mask)."""
    score_fn.keeps_positions = True  # type: ignore[attr-defined]
    return score_fn


def logits_at(
    score_fn: ScoreFn, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The logits where the (batch, seq) bool `mask` is True, (n_kept, vocab) in row-major order: computed
    there only when `score_fn` can, else cut from the full logits."""
    if getattr(score_fn, "keeps_positions", False):
        return _logits(score_fn(input_ids, attention_mask, positions=mask))
    return _logits(score_fn(input_ids, attention_mask))[mask]


# ------------------------------------------------------------------------------------------------- ROUGE-L


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, lowercase: bool = True) -> float:
    """ROUGE-L F1 on whitespace tokens (longest common subsequence); 0.0 when either side is empty."""
    if lowercase:
        prediction, reference = prediction.lower(), reference.lower()
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(map(rouge_l, predictions, references)) / len(predictions)


# -------------------------------------------------------------------------------------------------- intervals


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default); (0, 1) when total is 0."""
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes}/{total}")
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # At 0 or total successes the bound on that side is exactly the estimate (rounding gave 1 - 2e-16).
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == total else min(1.0, centre + half_width)
    return low, high


# ------------------------------------------------------------------------------------------------ losses


def completion_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log-probabilities of the scored (label != -100) tokens, and the count of those tokens.

    HF shift convention: the logits at position t predict the token at t+1. `logits` is (batch, seq, vocab),
    or (n_kept, vocab) where the (batch, seq) bool `mask` is True (`target_token_mask(labels)` or a superset,
    as `logits_at` returns them). Only scored positions go through log_softmax, so a large vocabulary costs
    memory only for the few target tokens.
    """
    if mask is None:
        mask = target_token_mask(labels)
        logits = logits[mask]  # (n_kept, vocab): the scored positions' logits only
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    kept_targets = targets[mask]  # (n_kept,)
    kept_rows = mask.nonzero()[:, 0]  # (n_kept,)
    scored = kept_targets != IGNORE_INDEX  # (n_kept,)
    picked = logits[scored].float()  # (n_scored, vocab)
    wanted = kept_targets[scored].unsqueeze(1)  # (n_scored, 1)
    token_log_probs = torch.log_softmax(picked, dim=-1).gather(1, wanted).squeeze(1)  # (n_scored,)
    rows = kept_rows[scored]  # (n_scored,)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32).index_add_(0, rows, token_log_probs)  # (batch,)
    counts = torch.zeros(labels.shape[0], dtype=torch.long).index_add_(0, rows, torch.ones_like(rows))
    return sums, counts


@torch.no_grad()
def eval_loss(score_fn: ScoreFn, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy over every scored token of the batches (as produced by `collate`)."""
    total_log_prob, total_tokens = 0.0, 0
    for batch in batches:
        mask = target_token_mask(batch["labels"])  # (batch, seq)
        logits = logits_at(score_fn, batch["input_ids"], batch["attention_mask"], mask)  # (n_kept, vocab)
        sums, counts = completion_log_probs(logits, batch["labels"], mask)
        total_log_prob += float(sums.sum())
        total_tokens += int(counts.sum())
    if total_tokens == 0:
        raise ValueError("no scored tokens in the evaluation batches")
    return -total_log_prob / total_tokens


# ------------------------------------------------------------------------------------------ classification


@dataclass
class LabelCount:
    total: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class ClassificationResult:
    """Accuracy with its 95 % Wilson interval, per-label counts and every prediction (in example order)."""

    correct: int
    total: int
    interval: tuple[float, float]
    per_label: dict[str, LabelCount]
    predictions: list[str] = field(default_factory=list)
    predicted_counts: dict[str, int] = field(default_factory=dict)
    scores: list[list[float]] = field(default_factory=list)  # [example][label]: summed completion log-prob

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for the metrics report (only aggregate figures; no per-example predictions)."""
        return {
            "accuracy": self.accuracy,
            "accuracy_ci_low": self.interval[0],
            "accuracy_ci_high": self.interval[1],
            "eval_examples": float(self.total),
        }


def classification_pair_rows(
    examples: Sequence[Example], labels: Sequence[str], tokenizer: Any, max_length: int, add_eos: bool = True
) -> list[TokenizedExample]:
    """Every (example, label) pair as one row (example-major), truncated exactly as in training; only the
    label's completion (and the eos with `add_eos`) is scored. Checks every example's label is in `labels`."""
    if not labels:
        raise ValueError("the label set is empty")
    if not examples:
        raise ValueError("no examples to evaluate")
    for ex in examples:
        if ex.label not in labels:
            raise ValueError(f"{ex.origin or 'example'}: label {ex.label!r} is not in the label set")
    rows: list[TokenizedExample] = []
    for ex in examples:
        for label in labels:
            ids, start, _ = encode_prompt_and_completion(
                tokenizer, ex, verbalise_label(label), max_length, add_eos
            )
            rows.append(TokenizedExample(ids, [IGNORE_INDEX] * start + ids[start:]))
    return rows


@torch.no_grad()
def score_label_pairs(
    score_fn: ScoreFn,
    rows: Sequence[TokenizedExample],
    gold: Sequence[str],
    label_set: Sequence[str],
    pairs_per_batch: int,
    pad_token_id: int,
) -> ClassificationResult:
    """Accuracy from `classification_pair_rows`' rows: each example's prediction is the label whose
    completion has the highest total log-prob; `gold` holds the examples' true labels, in order."""
    labels = list(label_set)
    if len(rows) != len(gold) * len(labels):
        raise ValueError(f"{len(rows)} rows for {len(gold)} examples x {len(labels)} labels")
    scores = torch.empty(len(rows), dtype=torch.float32)
    for start in range(0, len(rows), pairs_per_batch):
        batch = collate(rows[start : start + pairs_per_batch], pad_token_id, padding_side="right")
        mask = target_token_mask(batch["labels"])  # (pairs, seq)
        logits = logits_at(score_fn, batch["input_ids"], batch["attention_mask"], mask)  # (n_kept, vocab)
        sums, _ = completion_log_probs(logits, batch["labels"], mask)
        scores[start : start + len(sums)] = sums
    by_example = scores.view(len(gold), len(labels))  # (examples, labels)
    best = by_example.argmax(dim=1)  # (examples,); ties go to the earlier label
    per_label = {label: LabelCount() for label in labels}
    predicted_counts = dict.fromkeys(labels, 0)
    predictions: list[str] = []
    correct = 0
    for truth, choice in zip(gold, best.tolist(), strict=True):
        predicted = labels[choice]
        predictions.append(predicted)
        predicted_counts[predicted] += 1
        count = per_label[truth]
        count.total += 1
        if predicted == truth:
            count.correct += 1
            correct += 1
    return ClassificationResult(
        correct=correct,
        total=len(gold),
        interval=wilson_interval(correct, len(gold)),
        per_label=per_label,
        predictions=predictions,
        predicted_counts=predicted_counts,
        scores=by_example.tolist(),
    )


@torch.no_grad()
def classification_accuracy(
    score_fn: ScoreFn,
    examples: Sequence[Example],
    label_set: Sequence[str],
    tokenizer: Any,
    max_length: int = 128,
    pairs_per_batch: int = 32,
    add_eos: bool = True,
    pad_token_id: int | None = None,
) -> ClassificationResult:
    """Predict each example's label as the label whose verbalised completion has the highest total log-prob.

    Every (example, label) pair is one row, truncated exactly as in training; rows are scored in batches
    of `pairs_per_batch` (right padding). `add_eos` scores the eos after the label too, as in training, which
    also separates a label from a longer label it is a prefix of.
    """
    labels = list(label_set)
    rows = classification_pair_rows(examples, labels, tokenizer, max_length, add_eos)
    if pad_token_id is None:
        pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_token_id")
    gold = [str(ex.label) for ex in examples]
    return score_label_pairs(score_fn, rows, gold, labels, pairs_per_batch, pad_token_id)
