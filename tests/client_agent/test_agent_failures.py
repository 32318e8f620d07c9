"""Agent failure paths: revoked credential, bad data (nothing sent), a light import, local state files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from client_agent.api import ControlPlaneClient, ExitCode, failure_from
from client_agent.job_data import prepare_job_data
from client_agent.state import JobCheckpoint, RoundPosition, approved_jobs, record_decision
from flglm import protocol
from flglm.data import DataError
from flglm.step_client import StepHttpError, StepServerUnavailable, StepUnauthorized
from tests.support.agent_processes import AgentProcess, agent_job_view, write_jsonl
from tests.support.capture_proxy import CaptureProxy
from tests.support.control_plane import Api, LiveServer, enrollment_token, free_port

GOOD_ROWS = [{"text": "a calm morning", "label": "calm"}, {"text": "a storm at sea", "label": "storm"}]


def enrolled_agent(tmp_path: Path, api: Api, live: LiveServer, name: str, server_url: str) -> AgentProcess:
    agent = AgentProcess(
        name, tmp_path / f"state-{name}", write_jsonl(tmp_path / f"{name}.jsonl", GOOD_ROWS), tmp_path / "log"
    )
    token = enrollment_token(api, name)
    done = agent.cli("enroll", "--server", server_url, "--token", token, "--ca-cert", str(live.tls.ca_cert))
    assert done.returncode == 0, done.stderr
    return agent


def test_a_revoked_agent_stops_with_a_clear_message_and_exit_code_3(
    tmp_path: Path, live_server: LiveServer, api: Api
) -> None:
    agent = enrolled_agent(tmp_path, api, live_server, "soon-revoked", live_server.base_url)
    client_id = api.ok("GET", "/clients", params={"limit": 100})["items"]
    (revoked_id,) = [c["id"] for c in client_id if c["name"] == "soon-revoked"]
    api.ok("POST", f"/clients/{revoked_id}/revoke")
    result = agent.cli("run", "--data", str(agent.data), "--quiet", "--stop-when-done", timeout=120)
    assert result.returncode == 3, result.stderr
    assert "revoked" in result.stderr and "flglm agent enroll" in result.stderr
    status = agent.cli("status")
    assert status.returncode == 3 and "revoked" in status.stderr


BAD_FILES: list[tuple[str, bytes, str]] = [
    (
        "missing.jsonl",
        b'{"text": "fine", "label": "calm"}\n{"text": "no label here"}\n',
        ':2: missing field "label"',
    ),
    ("empty.jsonl", b"", "file is empty"),
    ("latin1.csv", b"text,label\ncalm sea,calm\ncaf\xe9 storm,storm\n", ":3:"),
    ("broken.jsonl", b'{"text": "ok", "label": "calm"}\n{"text": \n', ":2: invalid JSON"),
]


def test_bad_data_files_name_file_line_and_problem_and_send_nothing(
    tmp_path: Path, live_server: LiveServer, api: Api
) -> None:
    proxy = CaptureProxy(live_server.base_url, live_server.tls.ca_cert)
    try:
        agent = enrolled_agent(tmp_path, api, live_server, "careless", proxy.url)
        before = len(proxy.requests)
        for name, content, problem in BAD_FILES:
            path = tmp_path / name
            path.write_bytes(content)
            result = agent.cli("run", "--data", str(path), "--quiet", "--stop-when-done", timeout=120)
            assert result.returncode == 2, result.stderr
            assert name in result.stderr and problem in result.stderr, result.stderr
            assert "nothing was sent" in result.stderr
        assert len(proxy.requests) == before, proxy.request_lines()[before:]
    finally:
        proxy.close()


def test_job_data_is_checked_against_the_job_labels_and_long_rows_are_counted(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, {"text": "a very long and winding sentence about the sea " * 3, "label": "calm"}]
    path = write_jsonl(tmp_path / "owner.jsonl", rows)
    with pytest.raises(DataError, match=r"owner\.jsonl:2: unknown label 'storm'"):
        prepare_job_data(path, agent_job_view(["calm", "breeze"]))
    data = prepare_job_data(path, agent_job_view(["calm", "storm"]))
    assert len(data.train) + data.held_out_count == 3
    assert data.train.truncated >= 1


def test_rows_are_verbalised_with_the_job_template(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "owner.jsonl", GOOD_ROWS * 5)
    job = agent_job_view(["calm", "storm"], template="Story: {text}\nMood:", eval_fraction=0.5)
    data = prepare_job_data(path, job)
    assert data.held_out and all(example.prompt.startswith("Story: ") for example in data.held_out)
    assert all(example.prompt_suffix == "\nMood:" for example in data.held_out)
    # Classification: the held-out set is tokenised once (with the template) and the tokenizer let go.
    assert data.tokenizer is None and data.classification_eval is not None
    assert data.classification_eval.gold == [str(example.label) for example in data.held_out]
    assert len(data.classification_eval.pair_rows) == 2 * len(data.held_out)


def test_state_files_are_private_and_checkpoints_round_trip(tmp_path: Path) -> None:
    record_decision(tmp_path, 7, approved=True)
    record_decision(tmp_path, 8, approved=True)
    record_decision(tmp_path, 8, approved=False)
    assert approved_jobs(tmp_path) == {7}
    checkpoint = JobCheckpoint(tmp_path, 7)
    adapters = {"front.lora_A": torch.randn(2, 3)}
    optimizer = {"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []}}
    checkpoint.save(RoundPosition(2, 1, "steps"), adapters, optimizer)
    assert checkpoint.position() == RoundPosition(2, 1, "steps")
    assert torch.equal(checkpoint.load_adapters()["front.lora_A"], adapters["front.lora_A"])
    assert checkpoint.load_optimizer_state()["optimizer"]["state"][0]["step"] == 3.0
    for path in checkpoint.directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path


BLOCKER = """
import sys
BLOCKED = {'fastapi', 'sqlalchemy', 'celery', 'uvicorn', 'alembic', 'redis', 'backend', 'worker'}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('agent must not import ' + name)
sys.meta_path.insert(0, Block())
import client_agent.runner, client_agent.state, client_agent.api, apps.cli.agent
print('light')
"""


def test_the_agent_imports_without_server_frameworks() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "light" in result.stdout, result.stderr


def test_protocol_mismatch_and_unreachable_server_map_to_their_exit_codes(
    live_server: LiveServer, api: Api
) -> None:
    with ControlPlaneClient(live_server.base_url, "no-such-credential", live_server.tls.ca_cert) as client:
        client._http.headers[protocol.PROTOCOL_HEADER] = "99"  # an agent from the future
        with pytest.raises(StepHttpError) as mismatch:
            client.heartbeat(None)
    assert mismatch.value.status == 426 and mismatch.value.code == "protocol_mismatch"
    failure = failure_from(mismatch.value)
    assert failure.exit_code == ExitCode.protocol_mismatch and "'99'" in str(failure)
    client = ControlPlaneClient(live_server.base_url, "no-such-credential", live_server.tls.ca_cert)
    with client, pytest.raises(StepUnauthorized) as unknown:  # the right version reaches authentication
        client.heartbeat(None)
    assert failure_from(unknown.value).exit_code == ExitCode.revoked

    closed = f"https://127.0.0.1:{free_port()}"
    client = ControlPlaneClient(closed, "x", live_server.tls.ca_cert, max_retries=2, backoff_s=0.01)
    with client, pytest.raises(StepServerUnavailable) as unreachable:
        client.work()
    failure = failure_from(unreachable.value)
    assert failure.exit_code == ExitCode.unreachable and "failed 3 times" in str(failure)
