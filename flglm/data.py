"""Client-side training data: load and validate JSONL/CSV files, verbalise, tokenise, split and batch them.

Everything here runs next to the data owner's files and does no network I/O. Two tasks are supported:

- generation: rows `{"prompt": ..., "completion": ...}`; the model learns `prompt + completion + eos`.
- classification: rows `{"text": ..., "label": ...}`, verbalised as generation with a template
  (default `"Text: {text}\\nLabel:"`) and the completion `" {label}" + eos`; the job declares the label set.

Only completion tokens are scored (prompt positions carry the label -100, the HF convention: `labels` is
aligned with `input_ids` and the loss shifts by one). Over-long rows lose the *tail of the prompt's text* (the
head of the text, the template's suffix and the whole completion are kept) and are counted, so the owner can
see how many.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch

from flglm.contracts.job_settings import DEFAULT_CLASSIFICATION_TEMPLATE as DEFAULT_CLASSIFICATION_TEMPLATE

Task = Literal["classification", "generation"]
TASKS: tuple[Task, ...] = ("classification", "generation")
LABEL_COMPLETION = " {label}"
IGNORE_INDEX = -100
REQUIRED_FIELDS: dict[str, tuple[str, str]] = {
    "classification": ("text", "label"),
    "generation": ("prompt", "completion"),
}
DATA_SUFFIXES = (".jsonl", ".csv")


class DataError(ValueError):
    """A data-file problem located by file and 1-based line: `news.jsonl:17: missing field "label"`."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Example:
    """One verbalised example: the model sees `prompt + prompt_suffix + completion + eos`.

    `prompt` is the part that may be truncated (at its end) when a row is too long; `prompt_suffix` (e.g.
    `"\\nLabel:"`) and `completion` are always kept whole. Classification examples also keep the raw `text`
    and `label` so they can be written back out and scored against every label of the label set.
    """

    prompt: str
    completion: str
    prompt_suffix: str = ""
    label: str | None = None
    text: str | None = None
    origin: str | None = None  # "file:line", for messages about this row

    @property
    def full_prompt(self) -> str:
        return self.prompt + self.prompt_suffix


def split_template(template: str) -> tuple[str, str]:
    """Split a classification template around its single `{text}` placeholder into (prefix, suffix)."""
    if template.count("{text}") != 1:
        raise ValueError(f"classification template must contain {{text}} exactly once, got {template!r}")
    prefix, suffix = template.split("{text}")
    if "{" in prefix + suffix or "}" in prefix + suffix:
        raise ValueError(f"classification template may only use the {{text}} placeholder, got {template!r}")
    return prefix, suffix


def verbalise_label(label: str) -> str:
    """The completion a classification label is trained and scored as (a leading space, no eos)."""
    return LABEL_COMPLETION.format(label=label)


def classification_example(
    text: str, label: str, template: str = DEFAULT_CLASSIFICATION_TEMPLATE, origin: str | None = None
) -> Example:
    """Verbalise a (text, label) pair as a generation example with the given template."""
    prefix, suffix = split_template(template)
    return Example(
        prompt=prefix + text,
        prompt_suffix=suffix,
        completion=verbalise_label(label),
        label=label,
        text=text,
        origin=origin,
    )


def generation_example(prompt: str, completion: str, origin: str | None = None) -> Example:
    return Example(prompt=prompt, completion=completion, origin=origin)


# ---------------------------------------------------------------------------------------------- loading files


def _read_utf8(path: Path) -> str:
    """The file's text; a missing file, an empty file or bad UTF-8 (with its line number) is a DataError."""
    if not path.exists():
        raise DataError(path, None, "file not found")
    if not path.is_file():
        raise DataError(path, None, "not a regular file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            path, line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(path, None, "file is empty")
    return text


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # Split on "\n" only: str.splitlines would also break at U+2028 and friends, which JSON allows raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(path, number, f"expected a JSON object, got {type(row).__name__}")
        yield number, row


def _csv_rows(path: Path, text: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DataError(path, 1, f"malformed CSV header ({exc})") from None
    header = [name.strip() for name in header]
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(
            path,
            1,
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"in header (found {', '.join(map(repr, header))})",
        )
    line_end = reader.line_num
    while True:
        start = line_end + 1  # a quoted field may span lines: the row starts after the previous one ended
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(path, start, f"malformed CSV ({exc})") from None
        line_end = reader.line_num
        if not cells or all(not cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise DataError(path, start, f"expected {len(header)} columns, found {len(cells)}")
        yield start, dict(zip(header, cells, strict=True))


def _string_field(path: Path, line: int, row: dict[str, Any], name: str, kind: str) -> str:
    if name not in row:
        raise DataError(path, line, f'missing {kind} "{name}"')
    value = row[name]
    if not isinstance(value, str):
        raise DataError(path, line, f'{kind} "{name}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise DataError(path, line, f'{kind} "{name}" is empty')
    return value


def load_examples(
    path: str | Path,
    task: Task,
    label_set: Sequence[str] | None = None,
    template: str = DEFAULT_CLASSIFICATION_TEMPLATE,
) -> list[Example]:
    """Read and validate one `.jsonl` or `.csv` file (UTF-8) into verbalised examples.

    Classification rows need `text` and `label` (a label outside `label_set`, when given, is an error);
    generation rows need `prompt` and `completion`. Extra fields are ignored. Every problem raises a DataError
    naming the file, the line and what is wrong.
    """
    path = Path(path)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "classification":
        split_template(template)  # a bad template is the job's fault, not the file's: fail before reading
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(path, None, f"unsupported file type {suffix or '(none)'!r}; use .jsonl or .csv")
    text = _read_utf8(path)
    required = REQUIRED_FIELDS[task]
    kind = "field" if suffix == ".jsonl" else "column"
    rows = _jsonl_rows(path, text) if suffix == ".jsonl" else _csv_rows(path, text, required)
    allowed = set(label_set) if label_set is not None else None
    examples: list[Example] = []
    for line, row in rows:
        first, second = (_string_field(path, line, row, name, kind) for name in required)
        origin = f"{path.name}:{line}"
        if task == "classification":
            label = second.strip()
            if allowed is not None and label not in allowed:
                shown = ", ".join(map(repr, sorted(allowed)[:20])) + (", ..." if len(allowed) > 20 else "")
                raise DataError(path, line, f"unknown label {label!r}; the job's labels are {shown}")
            examples.append(classification_example(first, label, template, origin))
        else:
            examples.append(generation_example(first, second, origin))
    if not examples:
        raise DataError(path, None, "no examples (only a header or blank lines)")
    return examples


def detect_task(path: str | Path) -> Task:
    """Guess the task of a data file from its first row's fields (`text`/`label` or `prompt`/`completion`)."""
    path = Path(path)
    text = _read_utf8(path)
    if path.suffix.lower() == ".csv":
        fields = {name.strip() for name in next(csv.reader(io.StringIO(text, newline="")))}
        line = 1
    else:
        line, row = next(_jsonl_rows(path, text))
        fields = set(row)
    for task in TASKS:
        if set(REQUIRED_FIELDS[task]) <= fields:
            return task
    raise DataError(
        path, line, 'cannot tell the task: expected fields "text"+"label" or "prompt"+"completion"'
    )


def label_set_of(examples: Sequence[Example]) -> list[str]:
    """The sorted distinct labels of classification examples."""
    return sorted({ex.label for ex in examples if ex.label is not None})


def shareable_example_count(examples: Sequence[Example], owner_allows: bool) -> int | None:
    """What the agent may report about its data: the example count if the owner allows it, else nothing."""
    return len(examples) if owner_allows else None


def write_examples_jsonl(examples: Sequence[Example], path: str | Path) -> None:
    """Write examples back as JSONL in the user-facing format (`text`/`label` or `prompt`/`completion`)."""
    with Path(path).open("w", encoding="utf-8") as out:
        for ex in examples:
            if ex.label is not None and ex.text is not None:
                row = {"text": ex.text, "label": ex.label}
            else:
                row = {"prompt": ex.full_prompt, "completion": ex.completion}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------ tokenising


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


# ------------------------------------------------------------------------------------ splitting and batching

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Indexable(Protocol[T_co]):
    """Anything with a length and integer indexing: a list, a TokenizedDataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> T_co: ...


def _default_stratum(item: object) -> Hashable:
    return item.label if isinstance(item, Example) else None


def train_eval_split(
    items: Sequence[T],
    eval_fraction: float,
    seed: int,
    stratify_by: Callable[[T], Hashable] | None = _default_stratum,
) -> tuple[list[T], list[T]]:
    """Deterministic local train/eval split, stratified by label for classification examples.

    Each stratum gives `round(n * eval_fraction)` items to eval (at least one item overall when
    `eval_fraction > 0` and there are two or more items). Both parts keep the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rng = random.Random(seed)
    strata: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        strata[stratify_by(item) if stratify_by is not None else None].append(index)
    eval_indices: set[int] = set()
    for key in sorted(strata, key=repr):  # a fixed order, so the rng draws are the same every run
        indices = strata[key]
        rng.shuffle(indices)
        eval_indices.update(indices[: round(len(indices) * eval_fraction)])
    if eval_fraction > 0 and not eval_indices and len(items) >= 2:
        eval_indices.add(rng.randrange(len(items)))
    train = [item for i, item in enumerate(items) if i not in eval_indices]
    held_out = [item for i, item in enumerate(items) if i in eval_indices]
    return train, held_out


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


def _check_batching(dataset: Indexable[Any], batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("cannot batch an empty dataset")


def _epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The permutation of epoch `epoch`: fixed by the seed and the epoch alone."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def iterate_batches(
    dataset: Indexable[T], batch_size: int, seed: int, epoch: int = 0, drop_last: bool = False
) -> Iterator[list[T]]:
    """Endless seeded batches: each epoch is a fresh permutation (fixed by seed and epoch), then the next.

    Starting at `epoch` lets a resumed agent continue the same sequence. With `drop_last` a short final batch
    of an epoch is skipped (unless the whole dataset is smaller than one batch, then it is the batch).
    """
    _check_batching(dataset, batch_size)
    while True:
        order = _epoch_order(len(dataset), seed, epoch)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if drop_last and len(chunk) < batch_size and len(order) >= batch_size:
                break
            yield [dataset[i] for i in chunk]
        epoch += 1


def batch_at(dataset: Indexable[T], batch_size: int, seed: int, index: int) -> list[T]:
    """Batch number `index` of `iterate_batches(dataset, batch_size, seed)`, found without producing the ones
    before it (a resumed agent at step 10,000 shuffles one epoch, not 10,000 batches)."""
    _check_batching(dataset, batch_size)
    if index < 0:
        raise ValueError(f"batch index must be >= 0, got {index}")
    epoch, position = divmod(index, -(-len(dataset) // batch_size))  # ceil: the short last batch counts
    order = _epoch_order(len(dataset), seed, epoch)
    return [dataset[i] for i in order[position * batch_size : (position + 1) * batch_size]]


# ----------------------------------------------------------------------------------- one directory of clients

LABELS_FILE = "labels.json"
EVAL_STEM = "eval"


@dataclass
class DataDir:
    """A data directory: one file per client (sorted by name), an optional shared eval file, the label set."""

    task: Task
    clients: dict[str, list[Example]]
    eval_examples: list[Example] | None
    labels: list[str] | None
    template: str


def write_client_files(
    partitions: Sequence[Sequence[Example]],
    out_dir: str | Path,
    eval_examples: Sequence[Example] | None = None,
    labels: Sequence[str] | None = None,
    template: str | None = None,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write `client-1.jsonl`, ... (or `<name>.jsonl` per partition when `names` is given), `eval.jsonl`
    and, for classification, `labels.json`.

    This is the layout `flglm demo` and `--data DIR` read back with `read_data_dir`.
    """
    if names is not None and len(names) != len(partitions):
        raise ValueError(f"{len(names)} client names for {len(partitions)} partitions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for number, examples in enumerate(partitions, start=1):
        stem = names[number - 1] if names is not None else f"client-{number}"
        path = out / f"{stem}.jsonl"
        write_examples_jsonl(examples, path)
        written.append(path)
    if eval_examples is not None:
        path = out / f"{EVAL_STEM}.jsonl"
        write_examples_jsonl(eval_examples, path)
        written.append(path)
    if labels is not None:
        path = out / LABELS_FILE
        meta = {
            "task": "classification",
            "labels": list(labels),
            "template": template or DEFAULT_CLASSIFICATION_TEMPLATE,
        }
        path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


def _read_labels_file(path: Path) -> tuple[list[str], str | None, str | None]:
    """(labels, template, task) from labels.json: either a JSON list of labels or an object with `labels`."""
    try:
        meta = json.loads(_read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"invalid JSON ({exc.msg})") from None
    if isinstance(meta, list):
        meta = {"labels": meta}
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
        raise DataError(path, None, 'expected a list of labels or an object with a "labels" list')
    labels = meta["labels"]
    if not labels or not all(isinstance(label, str) and label.strip() for label in labels):
        raise DataError(path, None, '"labels" must be a non-empty list of non-empty strings')
    if len(set(labels)) != len(labels):
        raise DataError(path, None, '"labels" has duplicates')
    template, task = meta.get("template"), meta.get("task")
    if template is not None and not isinstance(template, str):
        raise DataError(path, None, '"template" must be a string')
    if task is not None and task != "classification":
        raise DataError(path, None, f'"task" in {LABELS_FILE} must be "classification", got {task!r}')
    return labels, template, task


def read_data_dir(data_dir: str | Path, task: Task | None = None, template: str | None = None) -> DataDir:
    """Load a directory of per-client files (`*.jsonl`/`*.csv`), an optional `eval.*` and `labels.json`.

    The task comes from the argument, else `labels.json` (classification), else the first file's fields. For
    classification without `labels.json` the label set is every label found in the files.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(root, None, "data directory not found")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    eval_files = [p for p in files if p.stem == EVAL_STEM]
    client_files = [p for p in files if p.stem != EVAL_STEM]
    if not client_files:
        raise DataError(root, None, "no client data files (*.jsonl or *.csv)")
    if len(eval_files) > 1:
        raise DataError(root, None, f"more than one eval file: {', '.join(p.name for p in eval_files)}")
    labels: list[str] | None = None
    labels_path = root / LABELS_FILE
    if labels_path.exists():
        labels, file_template, _ = _read_labels_file(labels_path)
        template = template or file_template
        task = task or "classification"
    task = task or detect_task(client_files[0])
    template = template or DEFAULT_CLASSIFICATION_TEMPLATE
    label_set = labels if task == "classification" else None
    clients = {p.stem: load_examples(p, task, label_set, template) for p in client_files}
    eval_examples = load_examples(eval_files[0], task, label_set, template) if eval_files else None
    if task == "classification" and labels is None:
        everything = [ex for examples in clients.values() for ex in examples] + (eval_examples or [])
        labels = label_set_of(everything)
    return DataDir(task=task, clients=clients, eval_examples=eval_examples, labels=labels, template=template)
