"""`flglm job init` (the commented job file) and job-spec errors that name the field, the allowed values and
the nearest one, in the CLI and the API's 422 alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from apps.cli.job_template import meaning
from apps.cli.main import app
from apps.cli.operator import read_job_spec
from flglm.protocol import JobSpec, TaskType
from tests.support.control_plane import Api, job_spec


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _assert_every_field(model: type[BaseModel], written: dict[str, Any], path: str = "") -> None:
    assert set(written) == set(model.model_fields), path or "top level"
    for name, info in model.model_fields.items():
        assert meaning(model, name, info) or _submodel(info.annotation), f"{path}{name} has no meaning"
        sub = _submodel(info.annotation)
        if sub is not None:
            _assert_every_field(sub, written[name], f"{path}{name}.")


@pytest.mark.parametrize("task", list(TaskType))
def test_job_init_lists_every_field_and_round_trips(task: TaskType, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["job", "init", "--task", task.value])
    assert result.exit_code == 0, result.output
    text = result.stdout
    written = yaml.safe_load(text)
    _assert_every_field(JobSpec, written)
    file = tmp_path / "job.yaml"
    file.write_text(text)
    spec = read_job_spec(file)  # what `flglm job submit` sends
    assert spec.task_type is task
    assert spec.model_dump(mode="json") == JobSpec.model_validate(written).model_dump(mode="json")
    labels = ["negative", "positive"] if task is TaskType.classification else None
    assert spec.hyperparameters.labels == labels
    assert "# LoRA rank" in text and "default 8" in text and "one of generation | classification" in text
    assert "one of float32 | float16 | bfloat16" in text  # a pattern's alternatives are listed too


def test_job_submit_names_field_allowed_values_and_nearest(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text(
        "name: x\nmodel: tiny:llama:0\ntask_type: clasification\nlabels: [a, b]\n"
        "hyperparameters: {lrr: 0.1}\nprivacy: {wire_dtype: float3}\n"
    )
    result = CliRunner().invoke(app, ["job", "submit", str(bad)], env={"FLGLM_SERVER": "https://127.0.0.1:9"})
    assert result.exit_code == 2, result.output
    output = result.output
    assert "nothing was sent" in output
    assert "model: unknown field; did you mean model_ref?" in output
    assert "model_ref: Field required" in output
    assert (
        "task_type: Input should be 'generation' or 'classification' (got 'clasification'); "
        "did you mean classification?"
    ) in output
    assert "labels: unknown field; did you mean hyperparameters.labels?" in output
    assert "hyperparameters.lrr: unknown field; did you mean lr?" in output
    assert "privacy.wire_dtype: Input should be 'float32', 'float16' or 'bfloat16' (got 'float3')" in output
    assert "pydantic.dev" not in output and "validation error" not in output.lower()

    far = tmp_path / "far.json"
    far.write_text('{"name": "x", "model_ref": "m", "zzz": 1}')
    output = CliRunner().invoke(app, ["job", "submit", str(far)]).output
    assert "zzz: unknown field; allowed: name, model_ref, task_type" in output

    for text, words in [("name: [unclosed\n", "not a readable job file"), ("- a\n", "\n  Input should be")]:
        broken = tmp_path / "broken.yaml"
        broken.write_text(text)
        result = CliRunner().invoke(app, ["job", "submit", str(broken)])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output


def test_api_422_names_field_allowed_values_and_nearest(api: Api) -> None:
    body = job_spec([], task_type="clasification")
    body["model"] = body.pop("model_ref")
    body["hyperparameters"] = {"batch_sise": 4}
    response = api.post("/jobs", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    message = error["message"]
    assert "body.model: unknown field; did you mean model_ref?" in message
    assert "body.hyperparameters.batch_sise: unknown field; did you mean batch_size?" in message
    assert "did you mean classification?" in message and "pydantic.dev" not in message
    by_field = {problem["field"]: problem for problem in error["fields"]}
    assert by_field["body.task_type"]["allowed"] == ["generation", "classification"]
    assert by_field["body.task_type"]["suggestion"] == "classification"
    assert by_field["body.model"]["suggestion"] == "model_ref"
    assert by_field["body.model_ref"]["message"] == "Field required"
    assert message == "; ".join(f"{p['field']}: {p['message']}" for p in error["fields"])  # one formatter
