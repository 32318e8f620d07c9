"""Recording step metrics (only for jobs the client approved) and artifacts."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from backend.audit.service import record
from backend.errors import Conflict
from backend.jobs.service import job_for_client
from backend.metrics.repository import ArtifactRepository, StepMetricRepository
from backend.models import Artifact, StepMetric
from flglm.protocol import JobStatus, StepMetricIn


class MetricForUnknownRound(Conflict):
    code = "metric_for_unknown_round"


class JobNotAcceptingMetrics(Conflict):
    code = "job_not_accepting_metrics"


def record_step_metric(
    session: Session, client_id: int, job_id: int, metric: StepMetricIn, now: datetime
) -> StepMetric:
    job = job_for_client(session, job_id, client_id, approved=True)
    if job.status not in (JobStatus.running, JobStatus.paused):
        raise JobNotAcceptingMetrics(f"job {job_id} is {job.status}")
    if metric.round_number > job.current_round:
        raise MetricForUnknownRound(f"round_number: job {job_id} is at round {job.current_round}")
    return StepMetricRepository(session).add(
        StepMetric(job_id=job_id, client_id=client_id, created_at=now, **metric.model_dump())
    )


def record_artifact(
    session: Session,
    actor: str,
    job_id: int,
    kind: str,
    uri: str,
    *,
    round_number: int | None = None,
    sha256: str | None = None,
    size_bytes: int | None = None,
) -> Artifact:
    """For the worker and FedAvg code: register a checkpoint or adapter file of a job."""
    artifact = ArtifactRepository(session).add(
        Artifact(
            job_id=job_id, round_number=round_number, kind=kind, uri=uri, sha256=sha256, size_bytes=size_bytes
        )
    )
    record(session, actor, "artifact.create", "job", job_id, {"artifact_id": artifact.id, "kind": kind})
    return artifact
