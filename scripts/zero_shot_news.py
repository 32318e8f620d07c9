"""Measure a model's zero-shot accuracy on the balanced news-outlet eval set (the demo's held-out set).

Usage: HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python scripts/zero_shot_news.py [--model REF]
Prints one JSON object as its last line. A few minutes on a CPU for SmolLM2-135M (400 examples x 8 labels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from flglm.corpora import NEWS_TEMPLATE, carve_balanced_eval, load_news_articles, make_classification_examples
from flglm.evaluation import classification_accuracy
from flglm.models import load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-label", type=int, default=50)
    parser.add_argument("--max-words", type=int, default=45)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--template", default=NEWS_TEMPLATE)
    parser.add_argument(
        "--no-eos", action="store_true", help="score the label tokens only, not the eos after"
    )
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    examples = make_classification_examples(load_news_articles(), args.max_words, args.template)
    eval_examples, _ = carve_balanced_eval(examples, args.per_label, args.seed)
    labels = sorted({str(ex.label) for ex in eval_examples})
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    autocast = contextlib.nullcontext() if args.fp32 else torch.autocast("cpu", dtype=torch.bfloat16)

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits  # (pairs, seq, vocab)

    started = time.perf_counter()
    result = classification_accuracy(
        score, eval_examples, labels, tokenizer, max_length=args.max_length, add_eos=not args.no_eos
    )
    for label, count in result.per_label.items():
        print(
            f"{label:12s} {count.correct:3d}/{count.total:3d}  predicted {result.predicted_counts[label]:3d}x"
        )
    summary = {
        "model": args.model,
        "examples": result.total,
        "labels": len(labels),
        "accuracy": round(result.accuracy, 4),
        "ci95": [round(v, 4) for v in result.interval],
        "majority_baseline": round(max(c.total for c in result.per_label.values()) / result.total, 4),
        "score_eos": not args.no_eos,
        "bf16_autocast": not args.fp32,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
