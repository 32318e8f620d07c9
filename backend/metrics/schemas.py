"""Metric models: agents post `StepMetricIn`; operators read `StepMetricView` and `JobProgressView`."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from flglm.protocol import ClientStatus, ConsentStatus, JobStatus, StepMetricIn, StepMetricView


class ClientProgressView(BaseModel):
    """One invited client of a job: who it is, whether it is online, and where its training stands."""

    client_id: int
    client_name: str
    client_status: ClientStatus
    consent: ConsentStatus
    online: bool
    last_heartbeat_at: datetime | None
    replica: int | None  # the server replica serving it; None until it approved
    round_number: int | None  # of its latest reported step; None before its first step
    step: int | None
    last_loss: float | None
    last_reported_at: datetime | None
    steps_reported: int
    tokens: int
    wire_bytes_up: int
    wire_bytes_down: int


class ReplicaLoadView(BaseModel):
    """One server replica: the clients dealt to it and the server steps it ran for them in the recent window
    (in the batch modes the clients of one step share one server step)."""

    replica: int
    client_ids: list[int]
    steps_in_window: int
    tokens_per_s: float | None  # None when idle or once the job ended


class JobProgressView(BaseModel):
    """Everything the dashboard's job page shows live, computed from reported step metrics in one call."""

    job_id: int
    status: JobStatus
    current_round: int
    rounds: int
    steps_per_round: int
    window_s: float
    tokens_per_s: float | None  # each client on its own clock in the recent window, summed; None: idle/ended
    steps_reported: int
    tokens: int
    wire_bytes_up: int
    wire_bytes_down: int
    clients: list[ClientProgressView]
    replicas: list[ReplicaLoadView]
    generated_at: datetime


__all__ = [
    "ClientProgressView",
    "JobProgressView",
    "ReplicaLoadView",
    "StepMetricIn",
    "StepMetricView",
]
