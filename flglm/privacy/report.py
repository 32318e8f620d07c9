"""What a privacy audit asks and reports (pydantic only, no torch): shared by CLI, API and agent."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from flglm.protocol import PrivacySpec, SplitPlanSpec, StrictModel

AttackName = Literal["known_weights_inversion", "learned_inverter", "gradient_next_token"]
Moment = Literal["first_step", "trained"]
ALL_ATTACKS: tuple[AttackName, ...] = ("known_weights_inversion", "learned_inverter", "gradient_next_token")
MAX_AUDIT_SEQUENCES = 256
MAX_AUDIT_SEQ_LEN = 256


class AuditRequest(StrictModel):
    """The job settings to audit and the text to attack (a public corpus, or the caller's own texts)."""

    model_ref: str = Field(min_length=1, max_length=500)
    split_plan: SplitPlanSpec = Field(default_factory=lambda: SplitPlanSpec())
    adapter_r: int = Field(default=8, ge=1, le=256)
    adapter_alpha: int = Field(default=16, ge=1, le=1024)
    privacy: PrivacySpec = Field(default_factory=lambda: PrivacySpec())
    sequences: int = Field(default=64, ge=1, le=MAX_AUDIT_SEQUENCES)
    seq_len: int = Field(default=64, ge=4, le=MAX_AUDIT_SEQ_LEN)
    corpus: Literal["news", "tweets"] = "news"
    texts: list[str] | None = Field(
        default=None, max_length=4096, description="attack these texts instead of the corpus"
    )
    attacks: list[AttackName] = Field(default_factory=lambda: list(ALL_ATTACKS))
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    inverter_steps: int = Field(
        default=300, ge=10, le=5000, description="training steps of the learned inverter (its strength)"
    )


class AttackResult(BaseModel):
    """One attack on one kind of tensor the server receives; recovery over `tokens` attacked tokens."""

    attack: AttackName
    target: Literal["h0", "dL/dh1"]
    description: str
    tokens: int
    recovered: int
    token_recovery: float
    token_recovery_ci: tuple[float, float]
    sequences: int
    exact_sequences: float
    rouge_l: float
    wall_s: float
    checks: dict[str, float] = Field(
        default_factory=dict, description="diagnostics of the attack itself, e.g. its shortlist's recall"
    )


class PrivacyAudit(BaseModel):
    """The audit of one setting: every attack's recovery, the strongest, and the noise's (ε, δ)."""

    request: AuditRequest
    moment: Moment = Field(description="first_step: the input block as the server sees it at step 0")
    attacks: list[AttackResult]
    strongest_attack: AttackName | None
    strongest_token_recovery: float | None
    activation_epsilon: float | None = Field(description="(ε, δ=1e-5) per h0 vector; None without noise")
    text_source: str
    wall_s: float
    finished_at: datetime
