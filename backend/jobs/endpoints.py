"""Job routes: the operator API (`/jobs`) and the agent's invitations, consent, work and round reports."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status
from starlette.concurrency import run_in_threadpool

from backend.api.deps import (
    AdminDep,
    ClientDep,
    OperatorDep,
    SessionDep,
    SettingsDep,
    WaitingClientDep,
    brief_session,
)
from backend.api.pagination import Page, PageDep
from backend.api.responses import ROLE_GATED, errors
from backend.jobs import service
from backend.jobs.auto_start import waiting_for
from backend.jobs.repository import JobRepository, ParticipantRepository, RoundRepository
from backend.jobs.schemas import (
    InviteRequest,
    JobView,
    ParticipantView,
    RoundParticipantView,
    RoundView,
)
from backend.jobs.work_signal import WorkSignal
from backend.models import Round, utc_now
from backend.privacy.matching import audited_figure
from backend.steps import service as steps_service
from flglm import protocol
from flglm.protocol import MAX_DB_INT, JobSpec, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=ROLE_GATED)
agent_router = APIRouter(tags=["agent"], responses=ROLE_GATED)

JobId = Annotated[int, Path(ge=1, le=MAX_DB_INT)]


@router.post("", response_model=JobView, status_code=status.HTTP_201_CREATED, responses=errors(409))
def create_job(spec: JobSpec, session: SessionDep, admin: AdminDep) -> JobView:
    return JobView.model_validate(service.create_job(session, admin.actor, spec, utc_now()))


@router.get("", response_model=Page[JobView])
def list_jobs(
    session: SessionDep, _: OperatorDep, page: PageDep, status: JobStatus | None = None
) -> Page[JobView]:
    rows, total = JobRepository(session).page(limit=page.limit, offset=page.offset, status=status)
    return Page(
        items=[JobView.model_validate(r) for r in rows], total=total, limit=page.limit, offset=page.offset
    )


@router.get("/{job_id}", response_model=JobView, responses=errors(404))
def show_job(job_id: JobId, session: SessionDep, _: OperatorDep) -> JobView:
    job = service.get_job(session, job_id)
    recovery, attack = audited_figure(session, job)
    view = JobView.model_validate(job)
    failures = {c.name: p.failure_reason for p, c in ParticipantRepository(session).list_for_job(job_id)}
    return view.model_copy(
        update={
            "audited_token_recovery": recovery,
            "audited_attack": attack,
            "waiting_for": waiting_for(session, job),
            "client_failures": {name: reason for name, reason in failures.items() if reason is not None},
        }
    )


def _transition_route(action: str) -> None:
    def transition(
        job_id: JobId, session: SessionDep, admin: AdminDep, request: Request, settings: SettingsDep
    ) -> JobView:
        job = service.transition(session, admin.actor, job_id, action, utc_now(), settings.job_keys_dir())
        view = JobView.model_validate(job)
        if action == "start":
            # The workers learn the job (participants' keys) only once its start is committed: a start that
            # rolls back must leave no spec behind (a spec is write-once: it would refuse the next start's).
            spec = steps_service.worker_job_spec(session, job, settings)
            session.commit()
            steps_service.publish_after_start(request.app.state.step_relay, spec)
        return view

    transition.__name__ = f"{action}_job"
    router.add_api_route(
        f"/{{job_id}}/{action}",
        transition,
        methods=["POST"],
        response_model=JobView,
        summary=f"{action.title()} a job",
        responses=errors(404, 409, 410, 503),
    )


for _action in ("open", "start", "pause", "resume", "cancel"):
    _transition_route(_action)


@router.get("/{job_id}/participants", response_model=list[ParticipantView], responses=errors(404))
def list_participants(job_id: JobId, session: SessionDep, _: OperatorDep) -> list[ParticipantView]:
    service.get_job(session, job_id)
    return [
        ParticipantView(
            client_id=c.id,
            client_name=c.name,
            client_status=c.status,
            consent=p.consent,  # type: ignore[arg-type]
            decided_at=p.decided_at,
        )
        for p, c in ParticipantRepository(session).list_for_job(job_id)
    ]


@router.post("/{job_id}/participants", response_model=list[ParticipantView], responses=errors(404, 409))
def invite_clients(
    job_id: JobId, body: InviteRequest, session: SessionDep, admin: AdminDep
) -> list[ParticipantView]:
    service.invite_clients(session, admin.actor, job_id, body.clients, utc_now())
    return list_participants(job_id, session, admin)


@router.get("/{job_id}/rounds", response_model=list[RoundView], responses=errors(404))
def list_rounds(job_id: JobId, session: SessionDep, _: OperatorDep) -> list[RoundView]:
    service.get_job(session, job_id)
    rounds = RoundRepository(session)
    return [_round_view(rounds, r) for r in rounds.list_for_job(job_id)]


@router.post("/{job_id}/rounds/{round_number}/close", response_model=RoundView, responses=errors(404, 409))
def close_round(
    job_id: JobId,
    round_number: Annotated[int, Path(ge=1, le=MAX_DB_INT)],
    session: SessionDep,
    admin: AdminDep,
) -> RoundView:
    round_ = service.close_round_now(session, admin.actor, job_id, round_number, utc_now())
    return _round_view(RoundRepository(session), round_)


def _round_view(rounds: RoundRepository, round_: Round) -> RoundView:
    return RoundView(
        number=round_.number,
        status=round_.status,  # type: ignore[arg-type]
        started_at=round_.started_at,
        deadline_at=round_.deadline_at,
        closed_at=round_.closed_at,
        close_reason=round_.close_reason,
        participants=[RoundParticipantView.model_validate(p) for p in rounds.participants(round_.id)],
    )


# --- agent side -----------------------------------------------------------------------------------


def _server_public_key(request: Request) -> str:
    key: str = request.app.state.server_public_key_b64
    return key


@agent_router.get(protocol.INVITATIONS_PATH, response_model=list[protocol.InvitationView])
def my_invitations(session: SessionDep, client: ClientDep) -> list[protocol.InvitationView]:
    return service.list_invitations(session, client.id)


@agent_router.post(
    protocol.INVITATION_DECISION_PATH, response_model=protocol.InvitationView, responses=errors(404, 409)
)
def decide_invitation(
    job_id: JobId, body: protocol.ConsentRequest, session: SessionDep, client: ClientDep
) -> protocol.InvitationView:
    return service.decide(session, client.id, client.actor, job_id, body.decision, utc_now())


@agent_router.get(protocol.AGENT_JOB_PATH, response_model=protocol.AgentJobView, responses=errors(404, 410))
def my_job(job_id: JobId, request: Request, session: SessionDep, client: ClientDep) -> protocol.AgentJobView:
    return service.agent_job_view(session, client.id, job_id, _server_public_key(request))


@agent_router.get(
    protocol.WORK_PATH,
    response_model=protocol.WorkResponse,
    description="The open rounds this agent is to work on. With `wait_s` > 0 a long-poll: when there is "
    "none, the answer waits until one of the agent's jobs changes (started, a round opened, paused, ended, "
    "the agent dropped) or `wait_s` passed (at most the server's FLGLM_WORK_WAIT_MAX_S), holding no database "
    "connection meanwhile.",
)
async def my_work(
    request: Request,
    client: WaitingClientDep,
    wait_s: Annotated[float, Query(ge=0, le=protocol.MAX_WORK_WAIT_S)] = 0.0,
) -> protocol.WorkResponse:
    signal: WorkSignal = request.app.state.work_signal
    deadline = time.monotonic() + min(wait_s, request.app.state.settings.work_wait_max_s)
    while True:
        since = signal.epoch  # before reading: a change from here on ends the wait at once
        assignments, job_ids = await run_in_threadpool(_read_work, request, client.id)
        remaining = deadline - time.monotonic()
        if assignments or remaining <= 0:
            return protocol.WorkResponse(assignments=assignments)
        await signal.wait(job_ids, since, remaining)


def _read_work(request: Request, client_id: int) -> tuple[list[protocol.WorkAssignment], list[int]]:
    """This client's assignments and the unended jobs whose changes would change them, in a brief session."""
    with brief_session(request) as session:
        assignments = service.work_for(session, client_id, _server_public_key(request))
        return assignments, ParticipantRepository(session).unended_job_ids(client_id)


@agent_router.post(
    protocol.ROUND_DONE_PATH, response_model=protocol.RoundDoneResponse, responses=errors(404, 409)
)
def report_round_done(
    job_id: JobId,
    round_number: Annotated[int, Path(ge=1, le=MAX_DB_INT)],
    body: protocol.RoundDoneRequest,
    session: SessionDep,
    client: ClientDep,
) -> protocol.RoundDoneResponse:
    return service.report_round_done(session, client.id, client.actor, job_id, round_number, body, utc_now())


@agent_router.post(
    protocol.AGENT_FAILURE_PATH,
    response_model=protocol.AgentFailureResponse,
    summary="Report a fatal error of this agent on a job",
    description="For an approved participant of a running or paused job: under `straggler_policy: fail` the "
    "job fails with the reason; under `drop` this client leaves the job, which goes on while min_clients "
    "remain. The reason shows in `GET /jobs/{id}` (`failure_reason`, `client_failures`). 404 unless the "
    "client approved the job; 409 `job_not_running` when the job is not running (repeats answer the state).",
    responses=errors(404, 409),
)
def report_failure(
    job_id: JobId, body: protocol.AgentFailureRequest, session: SessionDep, client: ClientDep
) -> protocol.AgentFailureResponse:
    return service.report_client_failure(session, client.id, client.actor, job_id, body.reason, utc_now())


__all__ = ["agent_router", "router"]
