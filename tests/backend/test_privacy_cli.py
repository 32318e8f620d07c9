"""`flglm privacy audit`: a tiny-model audit run here (`--json`, the table, bad input), and one run by a real
`flglm serve` on a job's own settings, waited for over HTTPS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from apps.cli.main import app
from flglm.privacy.report import PrivacyAudit
from tests.support.flglm_serve import ADMIN

ROWS = [
    "The river rose overnight and the town council met at dawn to plan the evacuation of the low streets.",
    {"text": "A small bakery on the corner sells rye bread, honey cakes and strong coffee to commuters."},
    {"prompt": "Summarise: the glacier's retreat was measured with drones. ", "completion": "It shrank."},
]
SMALL = ["--sequences", "4", "--seq-len", "8", "--no-progress"]
QUICK_ATTACKS = ["--attacks", "known_weights_inversion,gradient_next_token"]


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    return path


def flglm(*args: str, env: dict[str, str] | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, (args, result.output)
    return result.stdout if code == 0 else result.output


def words_of(output: str) -> str:
    """The output's words on one line, without the error box's frame (it wraps at 80 columns)."""
    return " ".join(output.replace("│", " ").split())


def last_json(stdout: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return body


def test_local_audit_prints_one_json_object_last_and_a_table_otherwise(texts: Path) -> None:
    args = ["privacy", "audit", "--model", "tiny:llama", "--texts", str(texts), *SMALL, *QUICK_ATTACKS]
    out = flglm(*args, "--activation-noise", "0.5", "--wire-dtype", "bfloat16", "--seed", "3", "--json")
    audit = PrivacyAudit.model_validate(last_json(out))
    assert audit.request.model_ref == "tiny:llama" and audit.request.seed == 3
    assert audit.request.privacy.activation_noise == 0.5 and audit.request.privacy.wire_dtype == "bfloat16"
    assert audit.request.texts is not None and len(audit.request.texts) == 3
    assert audit.request.texts[2].endswith("It shrank.")  # prompt and completion joined
    assert [a.attack for a in audit.attacks] == ["known_weights_inversion", "gradient_next_token"]
    assert audit.activation_epsilon is not None and audit.text_source == "3 given texts"

    table = flglm(*args)
    assert "known_weights_inversion" in table and "gradient_next_token" in table
    assert "* strongest:" in table and "no (ε, δ) guarantee" in table
    assert not table.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--sequences", "0"], "sequences: Input should be greater than or equal to 1"),
        (["--seq-len", "100000"], "seq_len: Input should be less than or equal to 256"),
        (["--attacks", "psychic"], "attacks.0: Input should be 'known_weights_inversion'"),
        (["--corpus", "emails"], "corpus: Input should be 'news' or 'tweets'"),
        (["--wire-dtype", "int8"], "privacy.wire_dtype: String should match pattern"),
        (["--decorrelation", "1"], "private_init_scale and decorrelation need private_front"),
        (["--front-layers", "0"], "Invalid value for '--front-layers'"),
    ],
)
def test_bad_local_input_is_refused_before_any_model_loads(args: list[str], words: str) -> None:
    output = flglm("privacy", "audit", "--model", "tiny:llama", *args, code=2)
    assert words in words_of(output)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("mine.csv", "text\nhello\n", "use a .txt or .jsonl file"),
        ("mine.jsonl", '"fine"\n{"text": \n', "mine.jsonl:2: invalid JSON"),
        ("mine.jsonl", '{"label": "x"}\n', 'an object with a "text" or "prompt" field'),
        ("mine.txt", "\n\n", "no texts in the file"),
    ],
)
def test_bad_text_files_name_the_file_and_line(tmp_path: Path, name: str, content: str, words: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    output = flglm("privacy", "audit", "--model", "tiny:llama", "--texts", str(path), code=2)
    assert words in words_of(output)


def test_a_job_audit_runs_on_the_server_and_is_waited_for(
    served: tuple[str, Path],
    texts: Path,
) -> None:
    base_url, ca_cert = served
    env = {"FLGLM_SERVER": base_url, "FLGLM_TOKEN": ADMIN, "FLGLM_CA_CERT": str(ca_cert)}
    spec = {"name": "audited", "model_ref": "tiny:llama", "privacy": {"gradient_noise": 0.1}}
    headers = {"Authorization": f"Bearer {ADMIN}"}
    job = httpx.post(f"{base_url}/api/v1/jobs", json=spec, headers=headers, verify=str(ca_cert)).json()
    args = ["privacy", "audit", "--job", str(job["id"]), "--texts", str(texts), *SMALL, *QUICK_ATTACKS]
    view = last_json(flglm(*args, "--json", env=env))
    assert view["status"] == "completed" and view["job_id"] == job["id"]
    audit = PrivacyAudit.model_validate(view["result"])
    assert audit.request.model_ref == "tiny:llama" and audit.request.privacy.gradient_noise == 0.1
    assert [a.attack for a in audit.attacks] == ["known_weights_inversion", "gradient_next_token"]

    output = flglm("privacy", "audit", "--job", "999999", env=env, code=1)
    assert "error job_not_found: job 999999 not found" in output
    output = flglm("privacy", "audit", "--job", str(job["id"]), "--activation-noise", "1", env=env, code=2)
    assert "--job audits the job's own settings; drop --activation-noise" in words_of(output)
