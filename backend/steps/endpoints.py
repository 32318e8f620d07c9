"""Agent step routes: upload a sealed step message, long-poll its result, exchange round-end client adapters.

Paths come from `flglm.step_protocol` (the agent's `StepClient` imports the same constants). Bodies are the
raw sealed envelope (`application/octet-stream`, capped by `max_body_bytes`). The database checks run in a
sync dependency (threadpool); the waiting runs in the step wait pool (see `backend.steps.relay`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.api.deps import SettingsDep, WaitingClientDep, brief_session
from backend.api.responses import ROLE_GATED, errors, raw_body
from backend.errors import refusal
from backend.steps import service
from backend.steps.relay import StepRelay
from backend.steps.service import StepAccess
from flglm.contracts.refusals import WrongDirection
from flglm.protocol import MAX_DB_INT, MAX_SEQUENCE
from flglm.step_protocol import (
    CLIENT_ADAPTERS_PATH,
    MAX_EXAMPLE_COUNT,
    MAX_LONG_POLL_S,
    STEP_MESSAGE_PATH,
    STEP_RESULT_PATH,
    MessageDirection,
    MessageRef,
    UploadOutcome,
    UploadReceipt,
    client_adapters_ref,
)

router = APIRouter(tags=["agent steps"], responses=ROLE_GATED)
T = TypeVar("T")

OCTET_STREAM = "application/octet-stream"
JobId = Annotated[int, Path(ge=1, le=MAX_DB_INT)]
RoundNumber = Annotated[int, Path(ge=1, le=MAX_DB_INT)]
WaitSeconds = Annotated[
    float, Query(ge=0, description=f"long-poll up to this many seconds (capped at {MAX_LONG_POLL_S})")
]


def step_relay(request: Request) -> StepRelay:
    relay: StepRelay = request.app.state.step_relay
    return relay


RelayDep = Annotated[StepRelay, Depends(step_relay)]

# What the step checks and refusals (`flglm.contracts.refusals`) answer; uploads add 415 and their raw body.
STEP_REFUSALS = errors(404, 409, 410, 503)
UPLOAD_REFUSALS = {**STEP_REFUSALS, **errors(415)}
SEALED_BODY = raw_body(OCTET_STREAM, description="the sealed envelope (flglm.wire.envelope)")


# Every route here may wait (for an admission verdict, or a long-poll): the database is asked in a brief
# session of its own, released before the waiting starts (never `SessionDep`, held until the route returns).


def _access_check(
    *, uploading: bool, after_close: str | None = None, with_round_clients: bool = False
) -> Callable[..., StepAccess]:
    """A dependency running `service.check_step_access` with these flags in a brief session."""

    def access(
        request: Request, job_id: JobId, round_number: RoundNumber, client: WaitingClientDep
    ) -> StepAccess:
        with brief_session(request) as session:
            return service.check_step_access(
                session,
                client.id,
                job_id,
                round_number,
                uploading=uploading,
                after_close=after_close,
                with_round_clients=with_round_clients,
            )

    return access


def step_upload_access(
    request: Request,
    job_id: JobId,
    round_number: RoundNumber,
    direction: MessageDirection,
    client: WaitingClientDep,
) -> StepAccess:
    """An upload's check; eval forwards may also name the round before the current one."""
    after_close = "eval messages" if direction is MessageDirection.eval_activations else None
    with brief_session(request) as session:
        return service.check_step_access(
            session, client.id, job_id, round_number, uploading=True, after_close=after_close
        )


StepUploadAccess = Annotated[StepAccess, Depends(step_upload_access)]
ReadAccess = Annotated[StepAccess, Depends(_access_check(uploading=False))]
# The adapters routes also need the round's participants (FedAvg starts once all of them uploaded).
# A round's adapters may be sent again after it closed, when the blob store lost them before its FedAvg ran.
AdaptersUploadAccess = Annotated[
    StepAccess,
    Depends(_access_check(uploading=True, after_close="adapters uploads", with_round_clients=True)),
]
AdaptersReadAccess = Annotated[StepAccess, Depends(_access_check(uploading=False, with_round_clients=True))]


def _step_ref(access: StepAccess, step: int, direction: MessageDirection, sequence: int) -> MessageRef:
    return MessageRef(
        job_id=access.job_id,
        round_number=access.round_number,
        step=step,
        client_id=access.client_id,  # from the credential: a client can only address its own messages
        direction=direction,
        sequence=sequence,
    )


async def read_typed_body(request: Request, accepted: tuple[str, ...], what: str) -> bytes:
    """The raw request body; 415 naming `accepted[0]` when the content type is none of `accepted`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type not in accepted:
        raise StarletteHTTPException(415, f"send {what} as {accepted[0]}, not {content_type!r}")
    return await request.body()


def _receipt_response(
    response: Response, ref: MessageRef, outcome: UploadOutcome, result_path: str | None
) -> UploadReceipt:
    response.status_code = status.HTTP_201_CREATED if outcome is UploadOutcome.stored else status.HTTP_200_OK
    return UploadReceipt(message=ref, outcome=outcome, result_path=result_path)


async def in_wait_pool(relay: StepRelay, blocking: Callable[..., T], *args: Any) -> T:
    """Run a blocking blob-store/task call in the step pool, leaving the request threadpool alone."""
    return await asyncio.get_running_loop().run_in_executor(relay.wait_pool, blocking, *args)


def _not_yet() -> Response:
    # The long-poll already waited: the agent asks again at once.
    return Response(status_code=status.HTTP_204_NO_CONTENT, headers={"Retry-After": "0"})


@router.put(
    STEP_MESSAGE_PATH,
    response_model=UploadReceipt,
    status_code=status.HTTP_201_CREATED,
    summary="Upload a sealed step message (201 stored, 200 identical duplicate, 409 conflicting duplicate)",
    responses={200: {"model": UploadReceipt, "description": "an identical duplicate"}, **UPLOAD_REFUSALS},
    openapi_extra=SEALED_BODY,
)
async def upload_step_message(
    request: Request,
    response: Response,
    access: StepUploadAccess,
    relay: RelayDep,
    settings: SettingsDep,
    step: Annotated[int, Path(ge=0, le=MAX_DB_INT)],
    direction: MessageDirection,
    sequence: Annotated[int, Path(ge=0, le=MAX_SEQUENCE)],
) -> UploadReceipt:
    if direction not in service.STEP_DIRECTIONS:
        raise refusal(
            WrongDirection(
                f"agents upload activations, gradients and eval_activations here, not {direction.value} "
                "(adapters go to the client-adapters path)"
            )
        )
    body = await read_typed_body(request, (OCTET_STREAM,), "the sealed envelope")
    ref = _step_ref(access, step, direction, sequence)
    outcome = await in_wait_pool(
        relay, service.store_upload, relay, ref, body, settings.step_admission_timeout_s
    )
    result_path = STEP_RESULT_PATH.format(
        job_id=ref.job_id,
        round_number=ref.round_number,
        step=step,
        direction=direction.value,
        sequence=sequence,
    )
    return _receipt_response(response, ref, outcome, result_path)


@router.get(
    STEP_RESULT_PATH,
    response_class=Response,
    responses={
        200: {"content": {OCTET_STREAM: {}}},
        204: {"description": "not ready yet; ask again"},
        **STEP_REFUSALS,
    },
    summary="Long-poll the sealed result of an upload (h1 for activations and eval_activations, dL/dh0 for "
    "gradients)",
)
async def wait_step_result(
    access: ReadAccess,
    relay: RelayDep,
    step: Annotated[int, Path(ge=0, le=MAX_DB_INT)],
    direction: MessageDirection,
    sequence: Annotated[int, Path(ge=0, le=MAX_SEQUENCE)],
    wait_s: WaitSeconds = 0.0,
) -> Response:
    if direction not in service.STEP_DIRECTIONS:
        raise refusal(WrongDirection(f"{direction.value} messages have no step result"))
    ref = _step_ref(access, step, direction, sequence)
    blob = await service.wait_for_result(relay, ref, min(wait_s, MAX_LONG_POLL_S))
    if blob is None:
        return _not_yet()
    return Response(content=blob, media_type=OCTET_STREAM)


@router.put(
    CLIENT_ADAPTERS_PATH,
    response_model=UploadReceipt,
    status_code=status.HTTP_201_CREATED,
    summary="Upload this client's sealed adapters at the end of a round, with its example count",
    responses={200: {"model": UploadReceipt, "description": "an identical duplicate"}, **UPLOAD_REFUSALS},
    openapi_extra=SEALED_BODY,
)
async def upload_client_adapters(
    request: Request,
    response: Response,
    access: AdaptersUploadAccess,
    relay: RelayDep,
    settings: SettingsDep,
    example_count: Annotated[
        int, Query(ge=0, le=MAX_EXAMPLE_COUNT, description="FedAvg weight: examples this client trained on")
    ],
) -> UploadReceipt:
    body = await read_typed_body(request, (OCTET_STREAM,), "the sealed envelope")
    outcome = await in_wait_pool(
        relay,
        service.store_adapters,
        relay,
        access,
        body,
        example_count,
        settings.step_admission_timeout_s,
    )
    ref = client_adapters_ref(access.job_id, access.round_number, access.client_id)
    path = CLIENT_ADAPTERS_PATH.format(job_id=access.job_id, round_number=access.round_number)
    return _receipt_response(response, ref, outcome, path)


@router.get(
    CLIENT_ADAPTERS_PATH,
    response_class=Response,
    responses={
        200: {"content": {OCTET_STREAM: {}}},
        204: {"description": "FedAvg not done yet; ask again"},
        **STEP_REFUSALS,
    },
    summary="Long-poll the round's FedAvg'd client adapters, sealed for this client",
)
async def wait_client_adapters(
    access: AdaptersReadAccess, relay: RelayDep, wait_s: WaitSeconds = 0.0
) -> Response:
    republishing = await in_wait_pool(relay, service.start_fedavg_when_complete, relay, access)
    ref = client_adapters_ref(access.job_id, access.round_number, access.client_id)
    blob = await service.wait_for_result(
        relay, ref, min(wait_s, MAX_LONG_POLL_S), upload_needed=not republishing
    )
    if blob is None:
        return _not_yet()
    return Response(content=blob, media_type=OCTET_STREAM)
