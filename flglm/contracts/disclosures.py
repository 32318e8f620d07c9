"""Every plain number an agent sends besides its encrypted cut tensors and adapters, with what it means.

One list, read twice: the consent text a data owner approves (`client_agent.privacy.consent_lines`) is
written from it, and the agent's API client sends no round metric that is not in it. Tests hold the upload
models and the round evaluation to it, so a new number cannot reach the server without being disclosed.
"""

from __future__ import annotations

# `StepMetricIn`, once per training step.
STEP_METRIC_FIELDS: dict[str, str] = {
    "round_number": "the round number",
    "step": "the step number",
    "loss": "the step's training loss",
    "tokens": "the batch's token count",
    "phase_timings_s": "how long the step took",
    "wire_bytes_up": "the bytes it sent",
    "wire_bytes_down": "the bytes it received",
}

# `RoundDoneRequest.eval_metrics`, once after training and once after evaluating each round.
ROUND_METRICS: dict[str, str] = {
    "train_loss": "the round's mean training loss",
    "eval_loss": "the loss on your held-out examples",
    "eval_examples": "how many held-out examples were evaluated",
    "accuracy": "classification accuracy on them",
    "accuracy_ci_low": "its 95 % interval (low end)",
    "accuracy_ci_high": "its 95 % interval (high end)",
    "rouge_l": "generation jobs: ROUGE-L on them",
}

# `HeartbeatRequest`, `EnrollRequest` and `RoundDoneRequest.example_count`: only with --share-example-count.
EXAMPLE_COUNT = "how many training examples you hold: only if the agent runs with --share-example-count"

# `AgentFailureRequest.reason` (`client_agent.job_watch.report_fatal`): once, when training a job fails here.
FAILURE_REPORT = (
    "if this agent cannot train a job: the error's type and message, so the job fails or drops you at once "
    "(for a data error only that your data does not fit, never its details)"
)


def disclosed_round_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The round metrics the consent text lists; any other key stays on this machine."""
    return {name: value for name, value in metrics.items() if name in ROUND_METRICS}


def describe(fields: dict[str, str]) -> str:
    """The meanings of `fields` as one phrase for the consent text, duplicates once."""
    return ", ".join(dict.fromkeys(fields.values()))
