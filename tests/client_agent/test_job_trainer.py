"""The trainer an agent builds for a job: only the client parts, the job's adapters, and the agent's memory
choices."""

from __future__ import annotations

from pathlib import Path

from client_agent.job_trainer import build_trainer
from client_agent.privacy import job_privacy
from client_agent.state import JobCheckpoint
from flglm.contracts.job_settings import Hyperparameters
from tests.support.agent_processes import agent_job_view


def test_an_agent_recomputes_its_input_block_at_backward(tmp_path: Path) -> None:
    """The input block's activations are not held while the server works (`recompute_front`): the step's
    peak then holds one block's graph, not two (`flglm bench memory` measures the difference)."""
    job = agent_job_view(["calm", "storm"])
    hp = Hyperparameters.model_validate(job.hyperparameters)
    checkpoint = JobCheckpoint(tmp_path, job.job_id)
    trainer = build_trainer(job, hp, job_privacy(job.job_id, job.privacy), checkpoint)
    assert trainer.recompute_front
