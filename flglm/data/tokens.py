"""Tokenising verbalised examples (only completion tokens are scored) and padding them into batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from flglm.data.files import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX on prompt positions
    truncated: bool = False


@dataclass
class TokenizedDataset:
    """Tokenised examples plus how many rows had to be truncated to fit `max_length`."""

    examples: list[TokenizedExample]
    max_length: int
    truncated: int = 0
    truncated_origins: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]

    def __iter__(self) -> Iterator[TokenizedExample]:
        return iter(self.examples)

    @property
    def scored_tokens(self) -> int:
        return sum(sum(1 for label in ex.labels if label != IGNORE_INDEX) for ex in self.examples)


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_prompt_and_completion(
    tokenizer: Any, example: Example, completion: str, max_length: int, add_eos: bool = True
) -> tuple[list[int], int, bool]:
    """Token ids of `prompt + suffix + completion (+ eos)`, the completion's start index, whether truncated.

    The prompt head (with any BOS the tokenizer adds) is tokenised on its own, so the text can be cut at a
    token boundary while the suffix and completion stay whole. If the completion alone cannot fit, its tail is
    cut too (still counted as truncated); at least one prompt token is always kept so the first target has a
    context.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    head = _ids(tokenizer, example.prompt, add_special_tokens=True)
    suffix = _ids(tokenizer, example.prompt_suffix, add_special_tokens=False) if example.prompt_suffix else []
    target = _ids(tokenizer, completion, add_special_tokens=False)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; pass add_eos=False or set one")
        target.append(int(tokenizer.eos_token_id))
    if not target:
        raise ValueError(f"{example.origin or 'example'}: the completion tokenises to nothing")
    truncated = False
    if len(head) + len(suffix) + len(target) > max_length:
        truncated = True
        head_budget = max_length - len(suffix) - len(target)
        if head_budget < 1:
            head = head[:1]
            if 1 + len(suffix) >= max_length:
                raise ValueError(
                    f"max_length {max_length} cannot hold the template suffix ({len(suffix)} tokens) "
                    "and a target"
                )
            target = target[: max_length - 1 - len(suffix)]
        else:
            head = head[:head_budget]  # keep the head of the text: it usually says the most
    prompt = head + suffix
    return prompt + target, len(prompt), truncated


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int, add_eos: bool = True
) -> TokenizedDataset:
    """Tokenise examples with the job's tokenizer; only completion (+eos) positions are scored."""
    dataset = TokenizedDataset(examples=[], max_length=max_length)
    for ex in examples:
        input_ids, start, truncated = encode_prompt_and_completion(
            tokenizer, ex, ex.completion, max_length, add_eos
        )
        labels = [IGNORE_INDEX] * start + input_ids[start:]
        dataset.examples.append(TokenizedExample(input_ids, labels, truncated))
        if truncated:
            dataset.truncated += 1
            dataset.truncated_origins.append(ex.origin or f"example {len(dataset.examples)}")
    return dataset


def collate(
    batch: Sequence[TokenizedExample],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row: `input_ids`, `attention_mask` (0 on pads), `labels` (-100 on pads)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (batch, seq)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose logits predict a scored token (label at t + 1 != -100) in some row: the only logits
    a loss or a score needs; (kept,)."""
    has_target = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)  # (seq - 1,)
    return has_target.nonzero().squeeze(-1)


def target_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) True at each (row, t) whose logits predict a scored token (label at t + 1 != -100): the
    only logits a loss needs, row by row (a right-padded batch's targets sit at different positions)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask
