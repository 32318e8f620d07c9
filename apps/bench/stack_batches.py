"""The full-stack benchmark's batches: the same real-text tokens for the centralized trainer and clients."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from flglm.tiny_models import TINY_CORPUS
from flglm.trainers import tokenize_lm_batch


def stack_bench_batch(
    tokenizer: PreTrainedTokenizerBase, batch_size: int, seq_len: int, client_index: int, step: int
) -> dict[str, torch.Tensor]:
    """Batch of (client, step): rows are rotations of the local corpus, distinct per client, step and row.

    Every row is longer than `seq_len` tokens for the bundled models, so rows are full (no padding) and
    real tokens = batch_size x seq_len.
    """
    text = " ".join(TINY_CORPUS)
    first = (client_index * 1009 + step * 97) * batch_size
    texts = []
    for row in range(batch_size):
        offset = ((first + row) * 37) % len(text)
        texts.append(text[offset:] + " " + text[:offset])
    return tokenize_lm_batch(tokenizer, texts, max_length=seq_len)
