"""Roles, the authenticated principal, and the token endpoints' models."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flglm.contracts.request_model import StrictModel


class Role(enum.StrEnum):
    admin = "admin"
    viewer = "viewer"
    client = "client"  # a client agent; never stored on an API token


@dataclass(frozen=True)
class Principal:
    kind: Literal["token", "client"]
    id: int
    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How the audit log names this principal."""
        return f"{self.kind}:{self.id}:{self.name}"


class PrincipalView(BaseModel):
    kind: Literal["token", "client"]
    id: int
    name: str
    role: Role


class ApiTokenCreate(StrictModel):
    name: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "viewer"]


class ApiTokenView(BaseModel):
    """What anyone may see of a token: never its secret nor the secret's hash."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None = Field(description="to the minute; null when never used")
    revoked_at: datetime | None


class ApiTokenCreated(ApiTokenView):
    token: str = Field(description="shown once; only its hash is stored")
