"""Fixtures of the flglm core tests: one torch thread, the tiny tokenizer and padded token batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from flglm.tiny_models import train_tiny_tokenizer
from tests.support.padded_batches import padded_batch


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


@pytest.fixture
def make_batch():  # type: ignore[no-untyped-def]
    """`tests.support.padded_batches.padded_batch` as a fixture."""
    return padded_batch
