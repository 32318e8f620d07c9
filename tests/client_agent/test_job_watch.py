"""`flglm agent run` against a scripted server: `--stop-when-done` ignores jobs that ended before the run,
a job waiting for approval is named once (silent with --quiet), and a fatal training error is reported."""

from __future__ import annotations

import types
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from client_agent import runner
from client_agent.api import AgentFailure, ExitCode
from client_agent.state import record_decision
from flglm import protocol
from flglm.data.files import DataError
from tests.support.agent_processes import write_jsonl

ROWS = [{"text": "a calm morning", "label": "calm"}, {"text": "a storm at sea", "label": "storm"}]


def invitation(job_id: int, status: str, consent: str = "approved") -> protocol.InvitationView:
    return protocol.InvitationView(
        job_id=job_id,
        name=f"job-{job_id}",
        model_ref="tiny",
        task_type=protocol.TaskType.classification,
        parallel_mode=protocol.ParallelMode.sequential,
        rounds=1,
        steps_per_round=1,
        hyperparameters={},
        privacy={},
        job_status=protocol.JobStatus(status),
        consent=protocol.ConsentStatus(consent),
    )


class ScriptedServer:
    """The agent's client: each `invitations()` call answers the next list of the script (the last one
    repeats); `work()` answers `assignments` once; failure reports are kept."""

    def __init__(
        self, script: list[list[protocol.InvitationView]], assignments: list[Any] | None = None
    ) -> None:
        self.script, self.calls = script, 0
        self.assignments = assignments or []
        self.reports: list[tuple[int, str]] = []

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def close(self) -> None:
        return None

    def heartbeat(self, example_count: int | None) -> None:
        return None

    def invitations(self) -> list[protocol.InvitationView]:
        if self.calls > 100:
            raise AssertionError("the agent never stopped")
        answer = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return answer

    def work(self, wait_s: float = 0.0) -> list[Any]:
        assignments, self.assignments = self.assignments, []
        return assignments

    def report_failure(self, job_id: int, reason: str) -> protocol.AgentFailureResponse:
        self.reports.append((job_id, reason))
        return protocol.AgentFailureResponse(
            job_id=job_id, job_status=protocol.JobStatus.failed, outcome="job_failed"
        )


@pytest.fixture
def agent_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory whose enrollment and key are stubs (the server is scripted)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setattr(runner, "load_enrollment", lambda _: types.SimpleNamespace(client_id=1))
    monkeypatch.setattr(runner, "ClientKeyPair", types.SimpleNamespace(load=lambda _: None))
    yield state


def run(
    state: Path, tmp_path: Path, server: ScriptedServer, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> Any:
    monkeypatch.setattr(runner, "open_client", lambda _: server)
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    defaults: dict[str, Any] = {"stop_when_done": True, "poll_s": 0.0, "heartbeat_s": 3600.0}
    return runner.run_agent(state, runner.RunOptions(data_path=data, **{**defaults, **options}))


def test_a_job_cancelled_before_the_run_never_makes_a_later_run_exit_8(
    agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_decision(agent_dir, 3, True)  # approved in an earlier run, then cancelled
    record_decision(agent_dir, 4, True)
    cancelled = invitation(3, "cancelled")
    server = ScriptedServer(
        [[cancelled, invitation(4, "running")]] * 3 + [[cancelled, invitation(4, "completed")]]
    )
    assert run(agent_dir, tmp_path, server, monkeypatch) is ExitCode.done
    # Nothing live at the start and nothing new: done at once, whatever ended before.
    server = ScriptedServer([[cancelled, invitation(4, "completed")]])
    assert run(agent_dir, tmp_path, server, monkeypatch) is ExitCode.done


def test_an_approved_job_that_fails_during_the_run_exits_8(
    agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_decision(agent_dir, 5, True)
    server = ScriptedServer([[invitation(5, "running")], [invitation(5, "cancelled")]])
    assert run(agent_dir, tmp_path, server, monkeypatch) is ExitCode.failed


def test_a_job_waiting_for_approval_is_named_once_and_never_under_quiet(
    agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    waiting = [invitation(4, "waiting_for_clients", "invited")]
    # Waits while the decision is open (a job already running can no longer take one: no reason to wait).
    script = [waiting] * 5 + [[invitation(4, "running", "invited")]]
    assert run(agent_dir, tmp_path, ScriptedServer(script), monkeypatch) is ExitCode.done
    lines = [line for line in capsys.readouterr().err.splitlines() if "approval" in line]
    assert lines == [
        "job 4 (job-4) is waiting for your approval: flglm agent approve 4 "
        "(or decline it: flglm agent decline 4; see flglm agent jobs)"
    ]
    assert run(agent_dir, tmp_path, ScriptedServer(script), monkeypatch, quiet=True) is ExitCode.done
    assert "approval" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ValueError("unknown model_ref 'tiny:lama'"), "ValueError: unknown model_ref 'tiny:lama'"),
        (
            DataError(Path("secret.jsonl"), 6, "unknown label 'my diagnosis'"),
            "the data owner's data does not fit the job (DataError; the details stay with the data owner)",
        ),
    ],
)
def test_a_fatal_training_error_is_reported_to_the_server_before_the_agent_stops(
    agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str
) -> None:
    record_decision(agent_dir, 7, True)

    def failing_session(*_: object) -> None:
        raise error

    monkeypatch.setattr(runner, "JobSession", failing_session)
    assignment = protocol.WorkAssignment.model_construct(
        job_id=7, round_number=1, steps=1, deadline_at=datetime.now(UTC), job=None
    )
    server = ScriptedServer([[invitation(7, "running")]], [assignment])
    with pytest.raises((AgentFailure, DataError)) as raised:
        run(agent_dir, tmp_path, server, monkeypatch)
    assert server.reports == [(7, reason)]
    if isinstance(raised.value, AgentFailure):
        assert raised.value.exit_code is ExitCode.failed
