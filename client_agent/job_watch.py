"""What `flglm agent run` learns from its invitations each poll: jobs waiting for this owner's approval (said
once per job), when `--stop-when-done` may stop and with which exit code, and fatal errors told to the server.

The `--stop-when-done` rule: the agent waits while an invitation of a job still waiting for clients awaits a
decision, or while a job it approved (here, `approved.json`, and on the server) is not over. Then it exits 0,
or 8 when one of those approved jobs failed or was cancelled after this run first saw it not yet ended. A job
that was already over when the run started never counts: an old cancelled job never makes a later run exit 8.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from client_agent.api import ControlPlaneClient, ExitCode
from client_agent.progress import show_notice
from flglm import protocol
from flglm.data.files import DataError

log = logging.getLogger("flglm.agent")

TERMINAL_JOB_STATUSES = frozenset(
    {protocol.JobStatus.completed, protocol.JobStatus.failed, protocol.JobStatus.cancelled}
)


class JobWatch:
    """The invitations seen during this run: which jobs it saw not yet ended, which approvals it asked for."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.seen_live: set[int] = set()
        self._asked: set[int] = set()

    def observe(self, invitations: Iterable[protocol.InvitationView]) -> list[protocol.InvitationView]:
        """Note the jobs not yet ended; ask once per job for the approvals still awaited. Returns the list."""
        invitations = list(invitations)
        for invitation in invitations:
            if invitation.job_status not in TERMINAL_JOB_STATUSES:
                self.seen_live.add(invitation.job_id)
            if awaits_decision(invitation) and invitation.job_id not in self._asked:
                self._asked.add(invitation.job_id)
                show_notice(
                    f"job {invitation.job_id} ({invitation.name}) is waiting for your approval: "
                    f"flglm agent approve {invitation.job_id} (or decline it: flglm agent decline "
                    f"{invitation.job_id}; see flglm agent jobs)",
                    self.quiet,
                )
        return invitations

    def outcome(self, invitations: Iterable[protocol.InvitationView], approved: set[int]) -> ExitCode | None:
        """`--stop-when-done`: None to go on, else the exit code (the rule in the module docstring)."""
        return finished_outcome(self.observe(invitations), approved, self.seen_live)


def awaits_decision(invitation: protocol.InvitationView) -> bool:
    """Invited, undecided, and the job still takes approvals (it waits for clients)."""
    return (
        invitation.consent is protocol.ConsentStatus.invited
        and invitation.job_status is protocol.JobStatus.waiting_for_clients
    )


def finished_outcome(
    invitations: list[protocol.InvitationView], approved: set[int], seen_live: set[int]
) -> ExitCode | None:
    """None while a decision is awaited or an approved job is still going; else `done`, or `failed` when an
    approved job this run saw not yet ended (`seen_live`) failed or was cancelled."""
    if any(awaits_decision(i) for i in invitations):
        return None
    mine = [
        i
        for i in invitations
        if i.consent is protocol.ConsentStatus.approved and i.job_id in approved and i.job_id in seen_live
    ]
    if any(i.job_status not in TERMINAL_JOB_STATUSES for i in mine):
        return None
    if any(i.job_status is not protocol.JobStatus.completed for i in mine):
        return ExitCode.failed
    return ExitCode.done


def report_fatal(client: ControlPlaneClient, job_id: int, exc: Exception) -> None:
    """Tell the server this agent cannot go on with the job, so it fails (or drops this client) with the
    reason now rather than at the round deadline. Best effort: the agent stops either way. A data error's
    details stay here (they may quote the data): the server hears only that the data does not fit."""
    if isinstance(exc, DataError):
        reason = (
            "the data owner's data does not fit the job (DataError; the details stay with the data owner)"
        )
    else:
        reason = f"{type(exc).__name__}: {exc}"
    try:
        answer = client.report_failure(job_id, reason)
    except Exception as report_error:
        log.warning("job %d: could not report this failure to the server: %s", job_id, report_error)
        return
    log.warning(
        "job %d: reported to the server (%s, job %s): %s", job_id, answer.outcome, answer.job_status, reason
    )
