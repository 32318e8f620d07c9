"""One directory of clients: a data file per client, an optional shared eval file and `labels.json`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flglm.data.files import (
    DATA_SUFFIXES,
    DEFAULT_CLASSIFICATION_TEMPLATE,
    DataError,
    Example,
    Task,
    detect_task,
    label_set_of,
    load_examples,
    read_utf8,
    write_examples_jsonl,
)

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
        meta = json.loads(read_utf8(path))
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
