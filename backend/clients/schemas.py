"""Operator-side models of client agents (the agent-side ones live in `flglm.protocol`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from flglm.contracts.request_model import StrictModel
from flglm.protocol import ClientStatus


class EnrollmentTokenCreate(StrictModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    expires_in_s: float | None = Field(None, gt=0, le=30 * 24 * 3600)


class EnrollmentTokenCreated(BaseModel):
    client_id: int
    name: str
    token: str = Field(description="one-time; give it to the data owner's agent (`flglm agent enroll`)")
    expires_at: datetime


class ClientView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    status: ClientStatus
    public_key: str | None
    example_count: int
    last_heartbeat_at: datetime | None
    online: bool = Field(False, description="active and its agent heartbeat within the lease")
    created_at: datetime
    enrolled_at: datetime | None
    revoked_at: datetime | None
