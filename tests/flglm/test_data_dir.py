"""A data directory with one file per client: written by the demo, read back by `--data DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flglm.data import (
    DataError,
    classification_example,
    detect_task,
    generation_example,
    read_data_dir,
    write_client_files,
)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    template = "Article: {text}\nOutlet:"
    clients = [
        [
            classification_example("Rain in Dublin", "RTE", template),
            classification_example("Bonn", "DW", template),
        ],
        [classification_example('Quote "x", comma', "BBC", template)],
    ]
    eval_set = [classification_example("Held out", "DW", template)]
    written = write_client_files(clients, tmp_path, eval_set, labels=["BBC", "DW", "RTE"], template=template)
    assert sorted(p.name for p in written) == [
        "client-1.jsonl",
        "client-2.jsonl",
        "eval.jsonl",
        "labels.json",
    ]
    assert json.loads((tmp_path / "client-1.jsonl").read_text().splitlines()[0]) == {
        "text": "Rain in Dublin",
        "label": "RTE",
    }

    data = read_data_dir(tmp_path)
    assert data.task == "classification" and data.labels == ["BBC", "DW", "RTE"] and data.template == template
    assert list(data.clients) == ["client-1", "client-2"]
    assert [ex.full_prompt for ex in data.clients["client-1"]] == [ex.full_prompt for ex in clients[0]]
    assert data.clients["client-2"][0].text == 'Quote "x", comma'
    assert data.eval_examples is not None and data.eval_examples[0].label == "DW"


def test_client_files_keep_their_owners_names(tmp_path: Path) -> None:
    parts = [[classification_example("a", "x")], [classification_example("b", "y")]]
    write_client_files(parts, tmp_path, labels=["x", "y"], names=["hospital-a", "clinic-b"])
    assert sorted(read_data_dir(tmp_path).clients) == ["clinic-b", "hospital-a"]
    with pytest.raises(ValueError, match="1 client names for 2 partitions"):
        write_client_files(parts, tmp_path / "bad", names=["only-one"])


def test_user_directory_with_csv_and_no_labels_file(tmp_path: Path) -> None:
    (tmp_path / "hospital-a.csv").write_text("text,label\nfever,flu\ncough,cold\n", encoding="utf-8")
    (tmp_path / "hospital-b.jsonl").write_text(json.dumps({"text": "sneeze", "label": "allergy"}) + "\n")
    (tmp_path / "README.txt").write_text("ignored")
    data = read_data_dir(tmp_path)
    assert data.task == "classification" and data.eval_examples is None
    assert data.labels == ["allergy", "cold", "flu"]  # the union of every client's labels
    assert data.clients["hospital-a"][0].full_prompt == "Text: fever\nLabel:"


def test_generation_directory(tmp_path: Path) -> None:
    write_client_files(
        [[generation_example("Q: 2+2?", " 4")], [generation_example("Q: hi", " hello")]], tmp_path
    )
    assert detect_task(tmp_path / "client-1.jsonl") == "generation"
    data = read_data_dir(tmp_path)
    assert data.task == "generation" and data.labels is None
    assert data.clients["client-2"][0].completion == " hello"


def test_labels_file_enforces_the_label_set(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps(["flu", "cold"]))
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x", "label": "flu"}) + "\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "x", "label": "cold"}) + "\n" + '{"text": "y", "label": "covid"}\n'
    )
    with pytest.raises(DataError, match=r"b\.jsonl:2: unknown label 'covid'"):
        read_data_dir(tmp_path)


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({}, "no client data files"),
        ({"eval.jsonl": '{"text": "x", "label": "a"}\n'}, "no client data files"),
        ({"a.jsonl": '{"text": "x", "label": "a"}\n', "labels.json": '{"labels": []}'}, "non-empty list"),
        ({"a.jsonl": '{"text": "x", "label": "a"}\n', "labels.json": '["a", "a"]'}, "duplicates"),
        ({"a.jsonl": '{"question": "x"}\n'}, "cannot tell the task"),
    ],
)
def test_bad_directories(tmp_path: Path, files: dict[str, str], problem: str) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=problem):
        read_data_dir(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data directory not found"):
        read_data_dir(tmp_path / "nope")
