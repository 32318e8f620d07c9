"""`flglm privacy frontier` on tiny:llama with a tiny budget: files written, cost against the first row, bad
settings files refused in words, and saved rows merged with --from-json without recomputing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from apps.cli.main import app

SETTINGS = """\
- name: plain
  front_layers: 1
- name: noisy
  front_layers: 1
  privacy: {activation_noise: 5.0, wire_dtype: bfloat16}
"""
TINY = [
    "--model", "tiny:llama", "--seeds", "0", "--audit-sequences", "2", "--audit-seq-len", "8",
    "--attacks", "known_weights_inversion,gradient_next_token", "--steps", "2", "--batch-size", "4",
    "--eval-per-label", "2", "--max-words", "10",
]  # fmt: skip


def flglm(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["privacy", "frontier", *args], env={"COLUMNS": "200"})
    assert result.exit_code == code, (args, result.output)
    return result.stdout if code == 0 else " ".join(result.output.replace("│", " ").split())


def last_json(stdout: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return body


def table_line(markdown: str, setting: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {setting} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_frontier_writes_its_files_and_saved_rows_rebuild_the_table(tmp_path: Path) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(SETTINGS)
    out = tmp_path / "frontier"
    summary = last_json(flglm("--settings", str(settings), *TINY, "--out", str(out), "--json"))

    rows = summary["rows"]
    assert [row["setting"] for row in rows] == ["plain", "noisy"] and summary["complete"]
    assert rows[1]["privacy"]["activation_noise"] == 5.0 and rows[1]["privacy"]["wire_dtype"] == "bfloat16"
    for row in rows:
        assert [run["seed"] for run in row["runs"]] == [0]
        assert row["mean_accuracy"] == row["runs"][0]["accuracy"]
        request = row["audit"]["request"]
        assert request["attacks"] == ["known_weights_inversion", "gradient_next_token"]
        assert [a["attack"] for a in row["audit"]["attacks"]] == request["attacks"]
        assert request["sequences"] == 2 and request["model_ref"] == "tiny:llama"
    assert rows[0]["audit"]["activation_epsilon"] is None and rows[1]["audit"]["activation_epsilon"] > 0
    assert summary["baseline_setting"] == "plain" and summary["baseline_accuracy"] == rows[0]["mean_accuracy"]
    assert summary["accuracy_cost_points"]["plain"] == 0.0
    assert summary["accuracy_cost_points"]["noisy"] == pytest.approx(
        100 * (rows[1]["mean_accuracy"] - rows[0]["mean_accuracy"])
    )
    assert json.loads((out / "frontier.json").read_text())["rows"] == rows
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "frontier.md").read_text()
    assert "| setting | input block | known_weights_inversion % | gradient_next_token % |" in markdown
    assert table_line(markdown, "plain")[5] == "none" and table_line(markdown, "plain")[-1] == "+0.0"
    assert "![privacy / utility frontier](frontier.png)" in markdown

    # Saved rows, one file each as measured apart, with known accuracies: the table is rebuilt from them
    # alone (a model that does not exist proves nothing is recomputed) and the cost follows the first row.
    plain, noisy = (dict(row) for row in rows)
    plain["runs"] = [{**plain["runs"][0], "accuracy": 0.5}]
    noisy["runs"] = [{**noisy["runs"][0], "accuracy": 0.25}, {**noisy["runs"][0], "seed": 1, "accuracy": 0.5}]
    noisy["mean_accuracy"] = 0.99  # stale in the file: recomputed from the runs
    plain_file, noisy_file = tmp_path / "plain.json", tmp_path / "noisy.json"
    plain_file.write_text(json.dumps(plain))
    noisy_file.write_text(json.dumps(noisy))
    merged = tmp_path / "merged"
    args = ["--model", "no-such-model", "--out", str(merged), "--json"]
    summary = last_json(flglm("--from-json", str(plain_file), str(noisy_file), *args))
    assert summary["baseline_accuracy"] == 0.5 and summary["rows"][1]["mean_accuracy"] == 0.375
    assert summary["accuracy_cost_points"] == {"plain": 0.0, "noisy": -12.5}
    markdown = (merged / "frontier.md").read_text()
    assert "accuracy seed 0 % | accuracy seed 1 % | mean accuracy % | vs plain (points) |" in markdown
    assert table_line(markdown, "noisy")[-4:] == ["25.0", "50.0", "37.5", "-12.5"]
    assert table_line(markdown, "plain")[-4:] == ["50.0", "–", "50.0", "+0.0"]
    assert (merged / "frontier.png").is_file()

    # The other order makes the noisy row the baseline.
    reversed_out = ["--out", str(tmp_path / "reversed"), "--json"]
    summary = last_json(flglm("--from-json", str(noisy_file), str(plain_file), *reversed_out))
    assert summary["baseline_setting"] == "noisy" and summary["accuracy_cost_points"]["plain"] == 12.5
    # A frontier.json is read back as its rows: the same table again.
    again = tmp_path / "again"
    flglm("--from-json", str(merged / "frontier.json"), "--out", str(again))
    assert (again / "frontier.md").read_text() == markdown


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("s.yaml", "name: plain\n", "expected a non-empty list of {name, front_layers, privacy}"),
        ("s.json", "[]", "expected a non-empty list"),
        ("s.json", '[{"front_layers": 1}]', "s.json: setting 1: name: Field required"),
        ("s.yaml", "- {name: a, privacy: {noise: 1}}\n", "privacy.noise: Extra inputs are not permitted"),
        ("s.yaml", "- {name: a}\n- {name: b, front_layers: 0}\n", "setting 2: front_layers: Input should be"),
        ("s.yaml", "- {name: a, privacy: {activation_noise: -1}}\n", "activation_noise: Input should be"),
        ("s.yaml", "- {name: a, privacy: {decorrelation: 1}}\n", "decorrelation need private_front"),
        ("s.yaml", "- {name: a}\n- {name: a}\n", "setting names must be unique; repeated: a"),
        ("s.json", "[{", "s.json: invalid JSON"),
        ("s.yaml", "- [unclosed\n", "s.yaml: invalid YAML"),
        ("s.toml", "x = 1\n", "use a .json, .yaml or .yml file"),
    ],
)
def test_bad_settings_files_are_refused_in_words(tmp_path: Path, name: str, content: str, words: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert words in flglm("--settings", str(path), "--model", "tiny:llama", code=2)


def test_bad_rows_and_options_are_refused_before_anything_runs(tmp_path: Path) -> None:
    row = tmp_path / "row.json"
    row.write_text(json.dumps({"setting": "plain", "front_layers": 1, "privacy": {}, "runs": []}))
    assert "row.json: not a frontier row: audit: Field required" in flglm("--from-json", str(row), code=2)
    assert "not a file" in flglm("--from-json", str(tmp_path / "missing.json"), code=2)
    assert "did you mean --from-json?" in flglm(str(row), code=2)
    assert "--seeds" in flglm("--seeds", "0,x", code=2) and "repeated" in flglm("--seeds", "1,1", code=2)
    assert "attacks.0: Input should be" in flglm("--attacks", "psychic", code=2)
    assert "seq_len: Input should be greater than or equal to 4" in flglm("--audit-seq-len", "2", code=2)
