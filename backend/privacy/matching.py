"""Which audit speaks for a job: the job's settings as an audit request, their key, and the figure that data
owners see in their invitation (the newest completed audit of exactly these settings, else none)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from backend.models import Job
from backend.privacy.repository import PrivacyAuditRepository
from flglm.contracts.job_settings import AdapterSpec
from flglm.privacy.report import AuditRequest

# The fields of `AuditRequest` that are the job's settings; the others only choose the text attacked.
SETTINGS_FIELDS = ("model_ref", "split_plan", "adapter_r", "adapter_alpha", "privacy")


def job_audit_request(job: Job, choices: dict[str, Any] | None = None) -> AuditRequest:
    """The audit of `job`'s current settings with the admin's `choices` (raises pydantic's ValidationError
    when the job's settings cannot be audited, e.g. an adapter rank beyond the audit's bound)."""
    adapter = AdapterSpec.model_validate(job.adapter)
    return AuditRequest.model_validate(
        {
            "model_ref": job.model_ref,
            "split_plan": job.split_plan,
            "adapter_r": adapter.r,
            "adapter_alpha": adapter.alpha,
            "privacy": job.privacy,
            **(choices or {}),
        }
    )


def settings_key(request: AuditRequest) -> str:
    """sha256 of the audited settings alone (defaults filled in), so equal settings have equal keys."""
    settings = request.model_dump(mode="json", include=set(SETTINGS_FIELDS))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def job_settings_key(job: Job) -> str | None:
    """The key of `job`'s current settings; None when they cannot be audited."""
    try:
        return settings_key(job_audit_request(job))
    except ValidationError:
        return None


def audited_figure(session: Session, job: Job) -> tuple[float | None, str | None]:
    """(token recovery, attack) of the strongest attack in the newest completed audit of `job`'s current
    settings; (None, None) when these settings were never audited."""
    key = job_settings_key(job)
    audit = None if key is None else PrivacyAuditRepository(session).newest_completed(job.id, key)
    if audit is None or audit.result is None:
        return None, None
    # Two fields read as stored, not the whole report re-validated: a report written by an older version of
    # `PrivacyAudit` must never break the agents' invitations.
    recovery, attack = audit.result.get("strongest_token_recovery"), audit.result.get("strongest_attack")
    if not isinstance(recovery, int | float) or isinstance(recovery, bool) or not isinstance(attack, str):
        return None, None
    return float(recovery), attack
