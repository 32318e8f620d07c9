"""Shared fixtures for the flglm core tests: the tiny tokenizer and padded token batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from flglm.tiny_models import TINY_VOCAB_SIZE, train_tiny_tokenizer

PADDINGS = ("none", "left", "right")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning OpenMP threads made
    these tests 10-20x slower; restored afterwards so other test folders keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer()


def padded_batch(padding: str, batch: int = 3, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with rows of different real lengths; labels are -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, TINY_VOCAB_SIZE, (batch, seq), generator=generator)  # (batch, seq)
    attention_mask = torch.ones_like(input_ids)
    if padding != "none":
        for row in range(batch - 1):  # the last row stays full length
            pad = 5 - 2 * row
            if padding == "left":
                attention_mask[row, :pad] = 0
            elif padding == "right":
                attention_mask[row, seq - pad :] = 0
            else:
                raise ValueError(padding)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def make_batch():  # type: ignore[no-untyped-def]
    """`padded_batch` as a fixture, so tests need not import from conftest."""
    return padded_batch
