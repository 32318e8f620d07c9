"""A job's data on this agent: the file validated against the job, tokenised and split train/eval locally.

For a classification job the held-out examples are tokenised once here and the tokenizer is dropped (it is
not needed to score them); a generation job keeps it to decode its greedy completions.

Nothing here talks to the server: a file that does not fit (unknown label, wrong task, bad row) raises a
`DataError` naming the file, the line and the problem before anything is sent.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flglm import protocol
from flglm.contracts.job_settings import Hyperparameters
from flglm.data.batches import train_eval_split
from flglm.data.files import DataError, Example, detect_task, label_set_of, load_examples
from flglm.data.tokens import TokenizedDataset, tokenize_examples
from flglm.models import load_tokenizer
from flglm.process_memory import release_freed_heap
from flglm.round_eval import ClassificationEval, prepare_classification_eval

log = logging.getLogger("flglm.agent")


def validate_data_file(path: Path) -> int:
    """Read and validate the whole file before anything is sent; returns its example count."""
    if not path.is_file():
        raise DataError(path, None, "file not found")
    return len(load_examples(path, detect_task(path)))


@dataclass
class JobData:
    train: TokenizedDataset
    held_out: list[Example]
    label_set: list[str]
    pad_token_id: int
    max_seq_len: int
    tokenizer: Any | None  # kept only where evaluation needs it (generation decodes its greedy tokens)
    classification_eval: ClassificationEval | None = None  # the held-out set tokenised once

    @property
    def held_out_count(self) -> int:
        return len(self.held_out)


def prepare_job_data(data_path: Path, job: protocol.AgentJobView) -> JobData:
    """Validate the file against the job (task, declared label set), tokenise with the job's tokenizer and
    split train/eval locally; a DataError names the file, line and problem. Never talks to the server."""
    hp = Hyperparameters.model_validate(job.hyperparameters)
    tokenizer = load_tokenizer(job.model_ref)
    examples = load_examples(data_path, job.task_type.value, label_set=hp.labels, template=hp.template)
    train, held_out = train_eval_split(examples, hp.eval_fraction, hp.seed)
    max_seq_len = hp.max_seq_len
    dataset = tokenize_examples(train, tokenizer, max_seq_len)
    if dataset.truncated:
        log.warning(
            "%d training rows were longer than %d tokens and truncated", dataset.truncated, max_seq_len
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    labels = list(hp.labels) if hp.labels else label_set_of(examples)
    if job.task_type.value != "classification":
        return JobData(dataset, held_out, labels, int(pad), max_seq_len, tokenizer)
    # Classification: tokenise the held-out set once and let the tokenizer go (30-45 MiB for SmolLM2).
    prepared = prepare_classification_eval(
        held_out, tokenizer, max_length=max_seq_len, label_set=labels, max_examples=hp.eval_examples
    )
    del tokenizer
    gc.collect()
    release_freed_heap()
    return JobData(dataset, held_out, labels, int(pad), max_seq_len, None, prepared)
