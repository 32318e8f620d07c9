"""A job's privacy settings as this agent reads them (refused when not understood) and the consent text that
says what the agent will apply; torch-free, so `flglm agent jobs` and `approve` stay light."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from client_agent.api import AgentFailure, ExitCode
from flglm import protocol
from flglm.contracts.disclosures import (
    EXAMPLE_COUNT,
    FAILURE_REPORT,
    ROUND_METRICS,
    STEP_METRIC_FIELDS,
    describe,
)
from flglm.privacy.epsilon import describe_activation_noise, hidden_size_hint


def job_privacy(job_id: int, privacy: dict[str, Any]) -> protocol.PrivacySpec:
    """The job's settings, or an AgentFailure naming every one this agent does not apply: a setting it
    ignored would be a defence the owner consented to and never got."""
    if privacy.get("activation_noise_std") in (0, 0.0):
        # Jobs stored before the real settings carry the old key at its default: it promised no noise, so
        # dropping it withholds nothing; any other value was consented to and never applied, so it refuses.
        privacy = {k: v for k, v in privacy.items() if k != "activation_noise_std"}
    try:
        return protocol.PrivacySpec.model_validate(privacy)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'privacy'}: {error['msg']}"
            for error in exc.errors()
        )
        raise AgentFailure(
            ExitCode.bad_usage_or_data,
            f"job {job_id}: refused: its privacy settings are not ones this agent applies ({problems}); "
            f"nothing was sent for it. Upgrade the agent, or `flglm agent decline {job_id}`",
        ) from None


def model_hidden_size(model_ref: str) -> int | None:
    """The hidden size without torch when the ref says it, else from the model's config (loads torch)."""
    size = hidden_size_hint(model_ref)
    if size is not None:
        return size
    try:
        from flglm.models import load_config

        return int(load_config(model_ref).hidden_size)
    except Exception:  # a model this machine cannot load: the text says ε is unknown
        return None


def consent_lines(view: protocol.InvitationView, hidden_size: int | None) -> list[str]:
    """What will leave this machine for `view` and which defences apply to it, one fact per line."""
    privacy = job_privacy(view.job_id, view.privacy)
    front_layers = int(view.split_plan.get("front_layers", 1))
    lines = [
        f"shared with the server: hidden states after your input block ({front_layers} block(s)) and "
        f"gradients at the cut ({privacy.wire_dtype}), encrypted",
        "  activation noise: "
        + (
            "off"
            if privacy.activation_noise <= 0
            else f"m = {privacy.activation_noise:g}, clip c = {privacy.activation_clip:g}: "
            + describe_activation_noise(privacy.activation_noise, privacy.activation_clip, hidden_size)
        ),
        "  gradient noise: "
        + (
            "off"
            if privacy.gradient_noise <= 0
            else f"Gaussian noise of {privacy.gradient_noise:g} x the gradient's RMS per coordinate"
        ),
    ]
    if privacy.private_front:
        lines.append(
            "  input block: private (its adapters come from a seed drawn and kept on this machine, never "
            f"uploaded or averaged; moved {privacy.private_init_scale:g} x |W| from the public weights at "
            f"the start; decorrelation λ = {privacy.decorrelation:g})"
        )
        lines.append("your output-block adapters once per round (encrypted, averaged with FedAvg)")
    else:
        lines.append("  input block: shared (its adapters are averaged with every other client's)")
        lines.append("your input- and output-block adapters once per round (encrypted, averaged with FedAvg)")
    if view.audited_token_recovery is None:
        lines.append("  audited token recovery: not audited")
    else:
        attack = f" ({view.audited_attack})" if view.audited_attack else ""
        lines.append(
            f"  audited token recovery: {100 * view.audited_token_recovery:.1f} % of training tokens "
            f"recovered by the strongest audited attack{attack}"
        )
    lines += [
        "in plain numbers (over TLS, readable by the operator and shown on the dashboard):",
        f"  every step: {describe(STEP_METRIC_FIELDS)}",
        f"  each round: {describe(ROUND_METRICS)}",
        f"  {EXAMPLE_COUNT}",
        f"  {FAILURE_REPORT}",
    ]
    return lines
