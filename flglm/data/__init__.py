"""Client-side training data: load and validate JSONL/CSV files, verbalise, tokenise, split and batch them.

Everything here runs next to the data owner's files and does no network I/O. Two tasks are supported:

- generation: rows `{"prompt": ..., "completion": ...}`; the model learns `prompt + completion + eos`.
- classification: rows `{"text": ..., "label": ...}`, verbalised as generation with a template
  (default `"Text: {text}\\nLabel:"`) and the completion `" {label}" + eos`; the job declares the label set.

Only completion tokens are scored (prompt positions carry the label -100, the HF convention: `labels` is
aligned with `input_ids` and the loss shifts by one). Over-long rows lose the *tail of the prompt's text* (the
head of the text, the template's suffix and the whole completion are kept) and are counted, so the owner can
see how many.

Modules
    `files` (torch-free): `Example`, `DataError`, reading and validating `.jsonl`/`.csv` files, verbalising.
    `tokens`: tokenising with the job's tokenizer and `collate` (the one module that needs torch).
    `batches` (torch-free): the local train/eval split and the seeded batch order (`iterate_batches`,
    `batch_at`).
    `client_dirs` (torch-free): a directory with one file per client, an optional eval file and `labels.json`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Lazy re-exports, as in `flglm.wire`: `from flglm.data import DataError` (or any torch-free name) does not
# import torch; only the names of `flglm.data.tokens` do, when first asked for.
_EXPORTS = {
    "DATA_SUFFIXES": "files",
    "DEFAULT_CLASSIFICATION_TEMPLATE": "files",
    "DataDir": "client_dirs",
    "DataError": "files",
    "EVAL_STEM": "client_dirs",
    "Example": "files",
    "IGNORE_INDEX": "tokens",
    "Indexable": "batches",
    "LABELS_FILE": "client_dirs",
    "LABEL_COMPLETION": "files",
    "REQUIRED_FIELDS": "files",
    "TASKS": "files",
    "Task": "files",
    "TokenizedDataset": "tokens",
    "TokenizedExample": "tokens",
    "batch_at": "batches",
    "classification_example": "files",
    "collate": "tokens",
    "detect_task": "files",
    "encode_prompt_and_completion": "tokens",
    "generation_example": "files",
    "iterate_batches": "batches",
    "label_set_of": "files",
    "load_examples": "files",
    "read_data_dir": "client_dirs",
    "shareable_example_count": "files",
    "split_template": "files",
    "tokenize_examples": "tokens",
    "train_eval_split": "batches",
    "verbalise_label": "files",
    "write_client_files": "client_dirs",
    "write_examples_jsonl": "files",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the real names, for type checkers; at run time `__getattr__` imports a module when asked
    from flglm.data.batches import Indexable, batch_at, iterate_batches, train_eval_split  # noqa: F401
    from flglm.data.client_dirs import EVAL_STEM, LABELS_FILE, DataDir, read_data_dir, write_client_files  # noqa: F401
    from flglm.data.files import (  # noqa: F401
        DATA_SUFFIXES,
        DEFAULT_CLASSIFICATION_TEMPLATE,
        LABEL_COMPLETION,
        REQUIRED_FIELDS,
        TASKS,
        DataError,
        Example,
        Task,
        classification_example,
        detect_task,
        generation_example,
        label_set_of,
        load_examples,
        shareable_example_count,
        split_template,
        verbalise_label,
        write_examples_jsonl,
    )
    from flglm.data.tokens import (  # noqa: F401
        IGNORE_INDEX,
        TokenizedDataset,
        TokenizedExample,
        collate,
        encode_prompt_and_completion,
        tokenize_examples,
    )


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"flglm.data.{_EXPORTS[name]}"), name)
