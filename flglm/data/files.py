"""Loading and validating the data owner's JSONL/CSV files into verbalised examples (torch-free)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flglm.contracts.job_settings import DEFAULT_CLASSIFICATION_TEMPLATE as DEFAULT_CLASSIFICATION_TEMPLATE

Task = Literal["classification", "generation"]
TASKS: tuple[Task, ...] = ("classification", "generation")
LABEL_COMPLETION = " {label}"
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


def read_utf8(path: Path) -> str:
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
    text = read_utf8(path)
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
    text = read_utf8(path)
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
