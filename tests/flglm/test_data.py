"""Loading, validation errors, verbalisation, tokenising, splitting and batching of client data."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from flglm.data import (
    DEFAULT_CLASSIFICATION_TEMPLATE,
    IGNORE_INDEX,
    DataError,
    TokenizedExample,
    batch_at,
    classification_example,
    collate,
    generation_example,
    iterate_batches,
    label_set_of,
    load_examples,
    shareable_example_count,
    tokenize_examples,
    train_eval_split,
)
from flglm.tiny_models import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# ------------------------------------------------------------------------------------------------- loading


def test_loads_classification_jsonl_and_verbalises(tmp_path: Path) -> None:
    path = write(tmp_path, "news.jsonl", jsonl({"text": "Rain in Dublin", "label": "RTE", "id": 7}) + "\n")
    (ex,) = load_examples(path, "classification", ["RTE", "BBC"])
    assert ex.text == "Rain in Dublin" and ex.label == "RTE"
    assert ex.full_prompt == "Text: Rain in Dublin\nLabel:" and ex.completion == " RTE"
    assert ex.origin == "news.jsonl:1"


def test_custom_template_splits_around_text(tmp_path: Path) -> None:
    path = write(tmp_path, "n.jsonl", jsonl({"text": "Storm", "label": "BBC"}))
    (ex,) = load_examples(path, "classification", None, template="Article: {text}\nOutlet:")
    assert (ex.prompt, ex.prompt_suffix, ex.completion) == ("Article: Storm", "\nOutlet:", " BBC")
    with pytest.raises(ValueError, match="exactly once"):
        load_examples(path, "classification", None, template="no placeholder")


def test_loads_generation_csv_with_quoted_multiline_field(tmp_path: Path) -> None:
    content = 'prompt,completion\n"Q: two\nlines","A"\nQ: next,B\n'
    path = write(tmp_path, "gen.csv", content)
    first, second = load_examples(path, "generation")
    assert (first.prompt, first.completion, first.origin) == ("Q: two\nlines", "A", "gen.csv:2")
    assert (second.prompt, second.origin) == ("Q: next", "gen.csv:4")  # physical line of the row's start


def test_jsonl_line_numbers_survive_crlf_and_raw_line_separators(tmp_path: Path) -> None:
    rows = '{"text": "a\u2028b", "label": "x"}\r\n\r\n{"text": "c", "label": "y"}\r\n{"text": "d"}\r\n'
    path = write(tmp_path, "crlf.jsonl", rows)
    with pytest.raises(DataError, match=r"crlf\.jsonl:4: missing field \"label\""):
        load_examples(path, "classification")
    path = write(tmp_path, "ok.jsonl", rows.rsplit('{"text": "d"}', 1)[0])
    first, second = load_examples(path, "classification")
    assert first.text == "a\u2028b" and second.origin == "ok.jsonl:3"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "bom.csv", "\ufefftext,label\nhello,a\n".encode())
    assert load_examples(path, "classification")[0].label == "a"


@pytest.mark.parametrize(
    ("name", "content", "task", "labels", "line", "problem"),
    [
        (
            "a.jsonl",
            jsonl({"text": "x", "label": "a"}, {"text": "y"}),
            "classification",
            None,
            2,
            'missing field "label"',
        ),
        (
            "a.jsonl",
            jsonl({"text": "x", "label": "a"}) + "{not json\n",
            "classification",
            None,
            2,
            "invalid JSON",
        ),
        ("a.jsonl", jsonl([1, 2]), "classification", None, 1, "expected a JSON object, got list"),
        (
            "a.jsonl",
            jsonl({"text": 5, "label": "a"}),
            "classification",
            None,
            1,
            'field "text" must be a string, got int',
        ),
        ("a.jsonl", jsonl({"text": "  ", "label": "a"}), "classification", None, 1, 'field "text" is empty'),
        (
            "a.jsonl",
            jsonl({"text": "x", "label": "a"}, {"text": "y", "label": "zzz"}),
            "classification",
            ["a", "b"],
            2,
            "unknown label 'zzz'; the job's labels are 'a', 'b'",
        ),
        (
            "g.jsonl",
            jsonl({"prompt": "p", "completion": ""}),
            "generation",
            None,
            1,
            'field "completion" is empty',
        ),
        ("a.csv", "text,category\nx,a\n", "classification", None, 1, "missing column 'label' in header"),
        ("a.csv", "text,label\nx,a\ny,b,extra\n", "classification", None, 3, "expected 2 columns, found 3"),
        ("a.csv", "text,label\nx,a\n,b\n", "classification", None, 3, 'column "text" is empty'),
    ],
)
def test_bad_rows_name_file_line_and_problem(
    tmp_path: Path, name: str, content: str, task: str, labels: list[str] | None, line: int, problem: str
) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as caught:
        load_examples(path, task, labels)  # type: ignore[arg-type]
    error = caught.value
    assert (error.path, error.line) == (str(path), line)
    assert problem in error.problem
    assert str(error).startswith(f"{path}:{line}: ")


def test_bad_encoding_reports_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "latin.jsonl", jsonl({"text": "ok", "label": "a"}).encode() + b'{"text": "caf\xe9"}\n'
    )
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8 \(byte 0xe9\)"):
        load_examples(path, "classification")


@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "file is empty"), ("\n  \n", "file is empty"), ("text,label\n", "no examples")],
)
def test_empty_files(tmp_path: Path, content: str, problem: str) -> None:
    path = write(tmp_path, "empty.csv", content)
    with pytest.raises(DataError, match=problem) as caught:
        load_examples(path, "classification")
    assert caught.value.line is None


def test_missing_file_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_examples(tmp_path / "nope.jsonl", "classification")
    path = write(tmp_path, "data.txt", "hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_examples(path, "classification")


def test_label_set_and_shared_count() -> None:
    examples = [classification_example("t", label) for label in ["b", "a", "b"]]
    assert label_set_of(examples) == ["a", "b"]
    assert shareable_example_count(examples, owner_allows=True) == 3
    assert shareable_example_count(examples, owner_allows=False) is None


# ---------------------------------------------------------------------------------------------- tokenising


def test_only_completion_and_eos_are_scored(tokenizer) -> None:
    ex = classification_example("The market rallied", "finance")
    (row,) = tokenize_examples([ex], tokenizer, max_length=64).examples
    prompt_ids = (
        tokenizer(ex.prompt)["input_ids"] + tokenizer(ex.prompt_suffix, add_special_tokens=False)["input_ids"]
    )
    target_ids = tokenizer(" finance", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row.input_ids == prompt_ids + target_ids
    assert row.labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    assert not row.truncated
    assert tokenizer.decode([t for t in row.labels if t != IGNORE_INDEX]) == " finance<eos>"


def test_truncation_cuts_text_tail_keeps_suffix_and_completion(tokenizer) -> None:
    long_text = "The city council approved a plan to build new bike lanes " * 6
    examples = [classification_example(long_text, "city"), classification_example("Short one", "city")]
    dataset = tokenize_examples(examples, tokenizer, max_length=30)
    assert dataset.truncated == 1 and dataset.truncated_origins == ["example 1"]
    long_row, short_row = dataset.examples
    assert len(long_row.input_ids) == 30 and long_row.truncated and not short_row.truncated
    decoded = tokenizer.decode(long_row.input_ids)
    assert decoded.startswith("Text: The city council")  # the head of the text is kept
    assert decoded.endswith("\nLabel: city<eos>")  # suffix and completion are whole
    assert long_row.labels[-3:] == long_row.input_ids[-3:]
    assert dataset.scored_tokens == sum(1 for r in dataset for t in r.labels if t != IGNORE_INDEX)


def test_generation_completion_longer_than_max_length_is_cut_and_counted(tokenizer) -> None:
    ex = generation_example("Q:", " federated learning trains one model on data that never leaves its owners")
    dataset = tokenize_examples([ex], tokenizer, max_length=8)
    (row,) = dataset.examples
    assert dataset.truncated == 1 and len(row.input_ids) == 8
    assert row.labels[0] == IGNORE_INDEX and all(t != IGNORE_INDEX for t in row.labels[1:])


def test_eos_can_be_left_out(tokenizer) -> None:
    (row,) = tokenize_examples([generation_example("Q:", " A")], tokenizer, 16, add_eos=False).examples
    assert row.input_ids[-1] != tokenizer.eos_token_id


# -------------------------------------------------------------------------------------------- collate/batch


def test_collate_right_and_left_padding() -> None:
    rows = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])]
    right = collate(rows, pad_token_id=0, padding_side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(rows, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert all(t.dtype == torch.long for t in left.values())
    with pytest.raises(ValueError, match="padding_side"):
        collate(rows, 0, padding_side="middle")  # type: ignore[arg-type]


def test_iterate_batches_is_seeded_and_cycles_epochs() -> None:
    data = list(range(10))
    first = list(islice(iterate_batches(data, 4, seed=3), 6))  # 3 batches per epoch (4, 4, 2)
    again = list(islice(iterate_batches(data, 4, seed=3), 6))
    assert first == again
    assert [len(b) for b in first] == [4, 4, 2, 4, 4, 2]
    epoch0, epoch1 = first[:3], first[3:]
    assert sorted(x for b in epoch0 for x in b) == data and sorted(x for b in epoch1 for x in b) == data
    assert epoch0 != epoch1  # a fresh permutation each epoch
    assert list(islice(iterate_batches(data, 4, seed=3, epoch=1), 3)) == epoch1  # resumable
    assert list(islice(iterate_batches(data, 4, seed=4), 3)) != epoch0
    assert [len(b) for b in islice(iterate_batches(data, 4, seed=3, drop_last=True), 4)] == [4, 4, 4, 4]


# ---------------------------------------------------------------------------------------------- splitting


def test_train_eval_split_is_deterministic_stratified_and_disjoint() -> None:
    examples = [classification_example(f"t{i}", "a" if i < 60 else "b", origin=str(i)) for i in range(80)]
    train, held = train_eval_split(examples, 0.25, seed=1)
    assert (train, held) == train_eval_split(examples, 0.25, seed=1)
    assert train_eval_split(examples, 0.25, seed=2)[1] != held
    assert Counter(ex.label for ex in held) == {"a": 15, "b": 5}  # each label keeps its share
    assert {ex.origin for ex in train}.isdisjoint({ex.origin for ex in held})
    assert len(train) + len(held) == 80


def test_train_eval_split_edges() -> None:
    train, held = train_eval_split([1, 2, 3], 0.1, seed=0)
    assert len(held) == 1 and len(train) == 2  # at least one eval item when asked for any
    assert train_eval_split([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split([1], 1.0, seed=0)


def test_default_template_constant() -> None:
    assert DEFAULT_CLASSIFICATION_TEMPLATE == "Text: {text}\nLabel:"


@pytest.mark.parametrize(("size", "batch_size"), [(10, 3), (9, 3), (2, 5), (1, 1)])
def test_batch_at_is_the_iterated_batch_without_iterating(size: int, batch_size: int) -> None:
    """A resumed agent asks for batch N directly; it must be exactly what iterating would have given."""
    data = list(range(size))
    batches = iterate_batches(data, batch_size, seed=7)
    expected = [next(batches) for _ in range(40)]
    assert [batch_at(data, batch_size, 7, index) for index in range(40)] == expected
    with pytest.raises(ValueError, match=">= 0"):
        batch_at(data, batch_size, 7, -1)
    with pytest.raises(ValueError, match="empty"):
        batch_at([], batch_size, 7, 0)
