"""The job state machine: which operator action or system event moves a job from which states to which."""

from __future__ import annotations

from flglm.protocol import JobStatus

S = JobStatus

# action -> (states it may start from, state it leads to)
TRANSITIONS: dict[str, tuple[frozenset[JobStatus], JobStatus]] = {
    "open": (frozenset({S.draft}), S.waiting_for_clients),
    "start": (frozenset({S.waiting_for_clients}), S.running),
    "pause": (frozenset({S.running}), S.paused),
    "resume": (frozenset({S.paused}), S.running),
    "cancel": (frozenset({S.draft, S.waiting_for_clients, S.running, S.paused}), S.cancelled),
    # System events, never requested over HTTP:
    "complete": (frozenset({S.running}), S.completed),
    "fail": (frozenset({S.waiting_for_clients, S.running, S.paused}), S.failed),
}

OPERATOR_ACTIONS = ("open", "start", "pause", "resume", "cancel")
TERMINAL_STATES = frozenset({S.completed, S.failed, S.cancelled})
# Invitations can change and data owners can decide only before training starts.
CONSENT_OPEN_STATES = frozenset({S.draft, S.waiting_for_clients})
