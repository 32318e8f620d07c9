"""What an admin may choose when starting a privacy audit of a job, and how an audit reads back."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from flglm.privacy.report import (
    MAX_AUDIT_SEQ_LEN,
    MAX_AUDIT_SEQUENCES,
    AttackName,
    AuditRequest,
    PrivacyAudit,
)
from flglm.protocol import StrictModel

MAX_AUDIT_TEXTS = 1024
MAX_AUDIT_TEXT_CHARS = 20_000
MAX_AUDIT_TEXTS_TOTAL_CHARS = 1_000_000  # the texts are kept with the audit's row


class AuditStatus(StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"


ACTIVE_AUDIT_STATES = (AuditStatus.queued, AuditStatus.running)

AuditText = Annotated[str, Field(min_length=1, max_length=MAX_AUDIT_TEXT_CHARS)]


class AuditStartRequest(StrictModel):
    """Optional choices of the audit; the settings audited are always the job's own. Omitted fields take
    `flglm.privacy.report.AuditRequest`'s defaults."""

    sequences: int | None = Field(default=None, ge=1, le=MAX_AUDIT_SEQUENCES)
    seq_len: int | None = Field(default=None, ge=4, le=MAX_AUDIT_SEQ_LEN)
    corpus: Literal["news", "tweets"] | None = None
    texts: list[AuditText] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_AUDIT_TEXTS,
        description="attack these texts instead of a built-in corpus",
    )
    attacks: list[AttackName] | None = Field(default=None, min_length=1, max_length=3)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> AuditStartRequest:
        if self.texts is not None and self.corpus is not None:
            raise ValueError("give either corpus or texts, not both")
        if self.texts is not None and sum(len(text) for text in self.texts) > MAX_AUDIT_TEXTS_TOTAL_CHARS:
            raise ValueError(f"texts: at most {MAX_AUDIT_TEXTS_TOTAL_CHARS:,} characters in all")
        if self.attacks is not None and len(set(self.attacks)) != len(self.attacks):
            raise ValueError("attacks contains duplicates")
        return self


class AuditProgressView(BaseModel):
    stage: str
    done: int
    total: int


class PrivacyAuditView(BaseModel):
    """One audit. `request` is what was audited (its `texts` left out: `own_texts` counts them); `result`
    the report once completed (its echoed request without texts too), `error` why it failed."""

    id: int
    job_id: int
    status: AuditStatus
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: AuditRequest
    own_texts: int = Field(description="how many texts the admin gave (0: the built-in corpus)")
    matches_job_settings: bool = Field(
        description="the audited settings equal the job's current ones (model, split, adapter, privacy)"
    )
    progress: AuditProgressView | None
    result: PrivacyAudit | None
    error: str | None
