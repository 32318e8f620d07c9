"""The demo's cached-prefix label scorer gives the same scores as the row-per-label scorer."""

from __future__ import annotations

import pytest
import torch

from apps.demo.scoring import score_labels
from flglm.data import classification_example, collate, tokenize_examples
from flglm.evaluation import classification_accuracy, eval_loss
from flglm.models import load_model, load_tokenizer

MODEL_REF = "tiny:llama:0"
LABELS = ["marmalade", "tangerine", "fjord walrus"]
TEXTS = ["quokka zeppelin harbour", "obsidian", "lantern walrus fjord cobalt quokka harbour", "cobalt fjord"]


def test_cached_scores_equal_row_scores() -> None:
    model, tokenizer = load_model(MODEL_REF), load_tokenizer(MODEL_REF)
    examples = [
        classification_example(text, LABELS[i % 3], "{text}\nOutlet:") for i, text in enumerate(TEXTS * 2)
    ]
    cached = score_labels(model, tokenizer, examples, LABELS, batch_size=3)
    rows = classification_accuracy(lambda ids, mask: model(input_ids=ids, attention_mask=mask), examples,
                                   LABELS, tokenizer)  # fmt: skip
    assert torch.allclose(torch.tensor(cached.scores), torch.tensor(rows.scores), atol=1e-4)
    assert cached.correct == rows.correct and cached.interval == rows.interval
    # The eval loss is the token-weighted cross-entropy of the true labels, as flglm.evaluation computes it.
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    batch = collate(list(tokenize_examples(examples, tokenizer, 128)), pad)
    expected = eval_loss(lambda ids, mask: model(input_ids=ids, attention_mask=mask), [batch])
    assert cached.eval_loss == pytest.approx(expected, rel=1e-4)


def test_unknown_eval_label_is_refused() -> None:
    model, tokenizer = load_model(MODEL_REF), load_tokenizer(MODEL_REF)
    with pytest.raises(ValueError, match="not in the label set"):
        score_labels(model, tokenizer, [classification_example("x", "plum")], LABELS)
