"""`GET /jobs/{id}/export` → `flglm job export --bundle` / `flglm generate --bundle`: the trained adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from typer.testing import CliRunner

from apps.cli.artifacts import escape_text, labelled_completions
from apps.cli.main import app as cli
from backend.settings import Settings
from flglm.adapters import (
    AdapterSpec,
    add_split_adapters,
    load_trainable_state_dict,
)
from flglm.export import read_export_bundle
from flglm.generation import SamplingConfig, generate_through_split
from flglm.models import load_model, load_tokenizer
from flglm.split import SplitPlan, split_model
from tests.support.control_plane import Api, job_spec
from tests.support.generation_jobs import write_trained_adapters


def test_export_route_bundle_and_cli(api: Api, settings: Settings, tmp_path: Path) -> None:
    job_id = api.ok("POST", "/jobs", 201, json=job_spec([], model_ref="tiny:llama"))["id"]
    refused = api.get(f"/jobs/{job_id}/export")
    assert refused.status_code == 409 and "no server adapter checkpoint" in refused.text
    assert api.post(f"/jobs/{job_id}/generate", json={"prompts": ["x"]}).status_code == 409
    assert api.post(f"/jobs/{job_id}/generate", json={"prompts": []}).status_code == 422
    client, body = write_trained_adapters(settings, job_id)

    response = api.get(f"/jobs/{job_id}/export")
    assert response.status_code == 200, response.text
    bundle = read_export_bundle(response.content)
    assert bundle.model_ref == "tiny:llama" and bundle.plan == SplitPlan(1, 1) and bundle.adapter_cfg.r == 8
    assert set(bundle.body_state) == set(body)  # optimizer state stays on the server
    assert all(torch.equal(bundle.body_state[k], body[k]) for k in body)
    assert all(torch.equal(bundle.front_back_state[k], client[k]) for k in client)
    audit = api.ok("GET", "/audit")
    assert any(event["action"] == "job.export" for event in audit["items"])

    bundle_file = tmp_path / "bundle.safetensors"
    bundle_file.write_bytes(response.content)
    out = tmp_path / "export"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["job", "export", str(job_id), "--out", str(out), "--bundle", str(bundle_file)]
    )
    assert result.exit_code == 0, result.output
    peft_model = PeftModel.from_pretrained(load_model("tiny:llama"), str(out)).eval()
    ids = torch.tensor([[5, 9, 30, 7, 2]])  # (batch, seq)
    split = split_model(load_model("tiny:llama"), SplitPlan(1, 1))
    add_split_adapters(split, AdapterSpec(r=8), 0)
    load_trainable_state_dict(split.as_module_dict(["front", "back"]), client)
    load_trainable_state_dict(split.part("body"), body)
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, split(ids), atol=1e-5)

    result = runner.invoke(
        cli,
        [
            "generate",
            str(job_id),
            "-p",
            "the news today",
            "--max-new-tokens",
            "5",
            "--bundle",
            str(bundle_file),
        ],
    )
    assert result.exit_code == 0, result.output
    tokenizer = load_tokenizer("tiny:llama")
    prompt = tokenizer(["the news today"], return_tensors="pt")
    expected = generate_through_split(
        split,
        prompt["input_ids"],
        prompt["attention_mask"],
        SamplingConfig(max_new_tokens=5),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    text = str(tokenizer.decode(expected[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True))
    # Raw bytes (`output` would turn "\r\n" into "\n"): the completion under its prompt, escaped.
    assert result.stdout_bytes.decode() == f"prompt 1: the news today\n  completion: {escape_text(text)}\n"

    # The API route runs the same split generation (front and back in the backend, the body on the
    # in-process worker); admins only, like the export: a viewer is refused before anything runs.
    viewer = api.ok("POST", "/tokens", 201, json={"name": "v", "role": "viewer"})["token"]
    request = {"prompts": ["the news today"], "max_new_tokens": 5}
    refused = api.as_(viewer).post(f"/jobs/{job_id}/generate", json=request)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_role"
    answer = api.ok("POST", f"/jobs/{job_id}/generate", json=request)
    assert answer["completions"] == [text] and answer["model_ref"] == "tiny:llama"
    assert api.as_(viewer).get(f"/jobs/{job_id}/export").status_code == 403


def test_export_of_unknown_job_is_404(api: Api) -> None:
    assert api.get("/jobs/999/export").status_code == 404


def test_generate_output_labels_completions_and_escapes_control_characters() -> None:
    prompts = ["say \x1b[2Jhi", "two\nlines"]
    completions = ["\x1b[31mred\r\n\u202eevil\\n\x00", " ok é 漢字"]
    assert labelled_completions(prompts, completions) == (
        "prompt 1: say \\x1b[2Jhi\n"
        "  completion: \\x1b[31mred\\r\\n\\u202eevil\\\\n\\x00\n"
        "prompt 2: two\\nlines\n"
        "  completion:  ok é 漢字\n"
    )
