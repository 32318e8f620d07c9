"""`flglm demo --quick --json` end to end as a user runs it: control plane, three agents, report (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
# About 4.5 min on a 2-core AVX2 machine since bf16 autocast is off where the CPU only emulates bf16 (it
# ran past 20 min with it on): twice that as room for a busy machine.
@pytest.mark.timeout(620)
def test_quick_demo_prints_json_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "demo", "--quick", "--json", "--no-progress",
         "--out", str(out), "--work-dir", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])

    n_eval = results["eval_examples"]
    assert n_eval == 8 * len(results["labels"]) == 64
    for key in ("zero_shot", "centralized", "federated"):
        r = results[key]
        assert 0.0 <= r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"] <= 1.0, key
        assert r["eval_examples"] == n_eval and r["eval_loss"] > 0
    fed, central = results["federated"], results["centralized"]
    # Both trainings worked: the held-out label-token loss is far below the base model's.
    assert fed["eval_loss"] < results["zero_shot"]["eval_loss"] - 1.0
    assert central["eval_loss"] < results["zero_shot"]["eval_loss"] - 1.0
    assert central["last_loss"] < central["first_loss"]
    rounds = results["federated"]["round_train_loss"]
    assert rounds[str(results["rounds"])] < rounds["1"]
    # Every client reported every step; the bytes are real encrypted traffic (activations both ways).
    steps = {(s["client"], s["round"], s["step"]) for s in fed["step_losses"]}
    assert len(steps) == results["clients"] * results["steps"] == 3 * 6
    assert fed["wire_bytes_up"] > 0 and fed["wire_bytes_down"] > 0
    assert results["centralized_batch_size"] == results["clients"] * results["batch_size_per_client"]

    markdown = Path(results["report"]["markdown"])
    png = Path(results["report"]["loss_png"])
    assert markdown.parent == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown.read_text()
    assert "FL-GLM federated" in text and "centralized LoRA" in text and f"Seed {results['seed']}" in text
    assert "dashboard: https://localhost:" in done.stdout  # printed while the job runs
    # The audit of the job's own settings, --quick sized: the news corpus's held-apart half, 4 x 16 tokens.
    audit = results["privacy_audit"]
    assert [a["attack"] for a in audit["attacks"]] == [
        "learned_inverter", "known_weights_inversion", "gradient_next_token",
    ]  # fmt: skip
    assert (audit["request"]["sequences"], audit["request"]["seq_len"]) == (4, 16)
    assert audit["request"]["model_ref"] == results["model"] and audit["text_source"].startswith("news")
    assert "## Privacy audit of this job" in text and "What the figures mean" in text


def test_bad_skew_is_refused_before_anything_starts() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "demo", "--skew", "lopsided"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--skew must be iid, dirichlet or extreme" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "demo", "--audit-seq-len", "2"],
        env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--audit-seq-len" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(320)
def test_own_data_and_model_without_an_eval_file(tmp_path: Path) -> None:
    """`--data DIR --model REF`: one file per client; with no eval file a balanced set is held out first."""
    data = tmp_path / "data"
    data.mkdir()
    words = ["quokka", "zeppelin", "harbour", "obsidian", "lantern", "walrus", "fjord", "cobalt"]
    for owner in range(3):
        rows = [
            {
                "text": f"{words[i % 8]} {words[(i * 3 + owner) % 8]}",
                "label": ["plum", "kiwi"][(i + owner) % 2],
            }
            for i in range(16)
        ]
        (data / f"owner-{owner}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "demo", "--data", str(data), "--model", "tiny:llama:0",
         "--rounds", "1", "--steps-per-round", "2", "--batch-size", "2", "--json", "--no-progress",
         "--out", str(tmp_path / "report"), "--threads", "1", "--no-audit"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["model"] == "tiny:llama:0" and results["labels"] == ["kiwi", "plum"]
    assert "privacy_audit" in results and results["privacy_audit"] is None  # --no-audit
    assert "Not run (`--no-audit`)" in (tmp_path / "report" / "report.md").read_text()
    assert results["eval_examples"] == 2 * 4  # 24 per label in all, a fifth (rounded down) held out
    assert results["train_examples"] == 48 - 8
    assert sorted(results["client_label_counts"]) == ["owner-0", "owner-1", "owner-2"]
    assert results["federated"]["wire_bytes_up"] > 0
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_private_input_blocks_are_scored_per_client(tmp_path: Path) -> None:
    """--private-front etc. reach the job, "federated" is the mean of the clients' own models, and the demo
    audits the job's own settings on the clients' training texts."""
    data = tmp_path / "data"
    data.mkdir()
    for owner in range(3):
        rows = [
            {"text": f"item {i} of owner {owner}", "label": ["plum", "kiwi"][(i + owner) % 2]}
            for i in range(16)
        ]
        (data / f"owner-{owner}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "demo", "--data", str(data), "--model", "tiny:llama:0",
         "--rounds", "1", "--steps-per-round", "2", "--batch-size", "2", "--json", "--no-progress",
         "--out", str(tmp_path / "report"), "--threads", "1", "--front-layers", "2",
         "--private-front", "--private-init-scale", "0.05", "--activation-noise", "0.5",
         "--gradient-noise", "0.5", "--decorrelation", "0.5", "--audit-sequences", "3",
         "--audit-seq-len", "12"],
        env=env, capture_output=True, text=True, timeout=460,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["split"] == "2 | middle | 1"
    assert results["privacy"] == {
        "wire_dtype": "bfloat16", "activation_noise": 0.5, "activation_clip": 1.0, "gradient_noise": 0.5,
        "private_front": True, "private_init_scale": 0.05, "decorrelation": 0.5,
    }  # fmt: skip
    fed = results["federated"]
    per_client = fed["per_client"]
    assert sorted(per_client) == ["owner-0", "owner-1", "owner-2"]
    accuracies = [s["accuracy"] for s in per_client.values()]
    assert fed["accuracy"] == sum(accuracies) / 3
    assert fed["accuracy_ci_low"] == min(s["accuracy_ci_low"] for s in per_client.values())
    # Each client's own input block makes its own model: the scores are not one model's thrice.
    assert len({s["eval_loss"] for s in per_client.values()}) == 3
    report = (tmp_path / "report" / "report.md").read_text()
    assert "mean over the clients' own models" in report
    # The audit attacked the job's settings (not the audit's defaults) on the 40 training texts.
    audit = results["privacy_audit"]
    assert sorted(a["attack"] for a in audit["attacks"]) == [
        "gradient_next_token", "known_weights_inversion", "learned_inverter",
    ]  # fmt: skip
    request = audit["request"]
    assert request["privacy"] == results["privacy"] and request["split_plan"]["front_layers"] == 2
    assert (request["adapter_r"], request["adapter_alpha"]) == (8, 16)
    assert (request["sequences"], request["seq_len"]) == (3, 12)
    assert audit["text_source"] == "40 given texts" and audit["activation_epsilon"] > 0
    for attack in audit["attacks"]:
        low, high = attack["token_recovery_ci"]
        assert low <= attack["token_recovery"] <= high and attack["tokens"] > 0
    assert "## Privacy audit of this job" in report and "share of training tokens a curious server" in report
    assert f"ε = {audit['activation_epsilon']:.3g}" in report
    bad = subprocess.run(
        [sys.executable, "-m", "apps.cli.main", "demo", "--decorrelation", "0.5"],
        env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "need private_front" in bad.stderr
