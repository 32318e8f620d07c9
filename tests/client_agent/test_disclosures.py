"""The one list of plain numbers an agent sends: the upload models hold nothing it leaves out, the consent
text names every entry, and what is not listed stays on the machine."""

from __future__ import annotations

from client_agent.privacy import consent_lines
from flglm import protocol
from flglm.contracts.disclosures import (
    FAILURE_REPORT,
    ROUND_METRICS,
    STEP_METRIC_FIELDS,
    disclosed_round_metrics,
)
from tests.client_agent.test_agent_privacy import invitation


def test_every_field_an_agent_uploads_in_plain_is_in_the_list() -> None:
    assert set(protocol.StepMetricIn.model_fields) == set(STEP_METRIC_FIELDS)
    assert set(protocol.RoundDoneRequest.model_fields) == {"example_count", "eval_metrics"}
    assert set(protocol.HeartbeatRequest.model_fields) == {"example_count"}
    assert set(protocol.AgentFailureRequest.model_fields) == {"reason"}  # FAILURE_REPORT


def test_consent_text_names_every_disclosed_number() -> None:
    text = "\n".join(consent_lines(invitation({}), hidden_size=32))
    for meaning in (*STEP_METRIC_FIELDS.values(), *ROUND_METRICS.values()):
        assert meaning in text, meaning
    assert "the loss on your held-out examples" in text and "classification accuracy on them" in text
    assert "--share-example-count" in text and FAILURE_REPORT in text


def test_an_unlisted_round_metric_is_not_sent() -> None:
    assert disclosed_round_metrics({"eval_loss": 1.0, "per_example_scores": 2.0}) == {"eval_loss": 1.0}
