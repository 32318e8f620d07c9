"""The frontier's settings files, saved rows and Markdown table (no torch: all checked before a run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flglm.privacy.report import ALL_ATTACKS, PrivacyAudit
from flglm.protocol import PrivacySpec, StrictModel


class FrontierInputError(ValueError):
    """A settings file or saved row that cannot be used, said in words with the file (and row) at fault."""


class SettingSpec(StrictModel):
    """One entry of a settings file: `{name, front_layers, privacy: {PrivacySpec fields}}`."""

    name: str = Field(min_length=1, max_length=100)
    front_layers: int = Field(default=1, ge=1)
    privacy: PrivacySpec = Field(default_factory=lambda: PrivacySpec())


class SeedRun(BaseModel):
    """One seed's training and scoring in a saved row (`train_and_score`'s output; extra keys are kept)."""

    model_config = ConfigDict(extra="allow")
    seed: int
    accuracy: float = Field(ge=0.0, le=1.0)


class SavedRow(BaseModel):
    """A `frontier_row` output as saved; only what the table and the plot read is checked."""

    model_config = ConfigDict(extra="allow")
    setting: str = Field(min_length=1)
    front_layers: int = Field(ge=1)
    privacy: PrivacySpec
    audit: PrivacyAudit
    runs: list[SeedRun]
    mean_accuracy: float | None = None


def _words(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'value'}: {error['msg']}" for error in exc.errors()
    )


def _read_structured(path: Path) -> Any:
    """A .json, .yaml or .yml file's content."""
    if not path.is_file():
        raise FrontierInputError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise FrontierInputError(f"{path}: not valid UTF-8") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise FrontierInputError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    except yaml.YAMLError as exc:
        raise FrontierInputError(f"{path}: invalid YAML ({exc})") from None
    raise FrontierInputError(f"{path}: use a .json, .yaml or .yml file")


def load_settings(path: Path) -> list[SettingSpec]:
    """The settings a file lists, validated with PrivacySpec; names must be unique (they label the rows)."""
    content = _read_structured(path)
    if not isinstance(content, list) or not content:
        raise FrontierInputError(f"{path}: expected a non-empty list of {{name, front_layers, privacy}}")
    settings: list[SettingSpec] = []
    for number, entry in enumerate(content, start=1):
        try:
            settings.append(SettingSpec.model_validate(entry))
        except ValidationError as exc:
            raise FrontierInputError(f"{path}: setting {number}: {_words(exc)}") from None
    names = [setting.name for setting in settings]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise FrontierInputError(f"{path}: setting names must be unique; repeated: {', '.join(repeated)}")
    return settings


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Saved rows: one `frontier_row` object, a list of them, or a `frontier.json` (its `rows`)."""
    content = _read_structured(path)
    if isinstance(content, dict) and isinstance(content.get("rows"), list):
        entries = content["rows"]
    elif isinstance(content, dict):
        entries = [content]
    elif isinstance(content, list):
        entries = content
    else:
        raise FrontierInputError(f"{path}: expected a frontier row, a list of rows or a frontier.json")
    if not entries:
        raise FrontierInputError(f"{path}: no rows in the file")
    rows: list[dict[str, Any]] = []
    for number, entry in enumerate(entries, start=1):
        try:
            SavedRow.model_validate(entry)
        except ValidationError as exc:
            where = f"{path}: row {number}" if len(entries) > 1 else str(path)
            raise FrontierInputError(f"{where}: not a frontier row: {_words(exc)}") from None
        rows.append(with_mean(entry))
    return rows


def with_mean(row: dict[str, Any]) -> dict[str, Any]:
    """The row with `mean_accuracy` recomputed from its runs (None without runs): a file cannot disagree."""
    runs = row.get("runs") or []
    mean = sum(float(run["accuracy"]) for run in runs) / len(runs) if runs else None
    return {**row, "mean_accuracy": mean}


def baseline_accuracy(rows: list[dict[str, Any]]) -> float | None:
    """The first row's mean accuracy: the first row is the undefended setting every cost is measured from."""
    return rows[0]["mean_accuracy"] if rows else None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def frontier_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What `frontier.json` and `--json` hold: the rows, the baseline and each row's cost in points."""
    baseline = baseline_accuracy(rows)
    costs = [
        None if baseline is None or row["mean_accuracy"] is None else 100 * (row["mean_accuracy"] - baseline)
        for row in rows
    ]
    return {
        "baseline_setting": rows[0]["setting"] if rows else None,
        "baseline_accuracy": baseline,
        "accuracy_cost_points": dict(zip((row["setting"] for row in rows), costs, strict=True)),
        "rows": rows,
    }


def frontier_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per setting: each attack's token recovery, the strongest, ε, accuracy per seed and mean, and
    the mean's difference from the first row in points."""
    attacks = [
        name
        for name in ALL_ATTACKS
        if any(result["attack"] == name for row in rows for result in row["audit"]["attacks"])
    ]
    seeds = sorted({int(run["seed"]) for row in rows for run in row["runs"]})
    summary = frontier_summary(rows)
    header = [
        "setting",
        "input block",
        *[f"{name} %" for name in attacks],
        "strongest",
        "ε (δ = 1e-5)",
        *[f"accuracy seed {seed} %" for seed in seeds],
        "mean accuracy %",
        f"vs {rows[0]['setting']} (points)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        audit = row["audit"]
        recovery = {result["attack"]: result["token_recovery"] for result in audit["attacks"]}
        by_seed = {int(run["seed"]): float(run["accuracy"]) for run in row["runs"]}
        epsilon = audit.get("activation_epsilon")
        strongest = (
            f"{audit['strongest_attack']} {_percent(audit['strongest_token_recovery'])} %"
            if audit.get("strongest_attack")
            else "–"
        )
        cost = summary["accuracy_cost_points"][row["setting"]]
        cells = [
            row["setting"],
            str(row["front_layers"]),
            *[_percent(recovery.get(name)) for name in attacks],
            strongest,
            "none" if epsilon is None else f"{epsilon:.3g}",
            *[_percent(by_seed.get(seed)) for seed in seeds],
            _percent(row["mean_accuracy"]),
            "–" if cost is None else f"{cost:+.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_report(rows: list[dict[str, Any]], png_name: str | None) -> str:
    """`frontier.md`: what was measured, the table and the plot."""
    audit = rows[0]["audit"]["request"]
    text = f"""# Privacy / utility frontier

Model `{audit["model_ref"]}`. Token recovery: the share of the attacked training tokens a curious server
reads back from what it receives at the first step, per attack ({audit["sequences"]} sequences x
{audit["seq_len"]} tokens for the first row); the gradient attack's figure is next-token recovery where the
client trains on every next token (a classification job exposes its label tokens that way). ε: the activation
noise's (ε, δ = 1e-5) per h0 vector, "none" without noise. Accuracy: the demo task trained and scored with the
defence in the model's path, per seed; the last column is the mean accuracy minus the first row's, in points.

{frontier_markdown(rows)}
"""
    if png_name is not None:
        text += f"\n![privacy / utility frontier]({png_name})\n"
    return text
