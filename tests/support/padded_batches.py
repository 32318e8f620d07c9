"""Random token batches with left, right or no padding, for the flglm core tests."""

from __future__ import annotations

import torch

from flglm.tiny_models import TINY_VOCAB_SIZE

PADDINGS = ("none", "left", "right")


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
