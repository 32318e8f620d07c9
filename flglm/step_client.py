"""`StepClient`: the agent's HTTPS transport of the step protocol (uploads, long-polls, client adapters).

Transport only: it moves sealed bytes and never sees a tensor or a key (sealing is `flglm.step_messages`,
the step itself `flglm.agent_step`). Paths and message models come from `flglm.step_protocol`, the same
ones the backend serves. Connection errors and 5xx answers are retried with exponential backoff and
jitter (every upload is idempotent, so a retried one has one effect), a certificate verification failure is
raised at once (`StepCertificateError`); 4xx answers raise a typed
`StepHttpError` carrying the server's error code and message (426: the backend speaks another protocol
version than `flglm.protocol.PROTOCOL_VERSION`, which every request sends).
"""

from __future__ import annotations

import random
import ssl
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from flglm.contracts.refusals import StepGraphMissing, UploadNotFound
from flglm.protocol import API_PREFIX, PROTOCOL_HEADER, PROTOCOL_VERSION
from flglm.step_protocol import (
    CLIENT_ADAPTERS_PATH,
    MAX_LONG_POLL_S,
    STEP_MESSAGE_PATH,
    STEP_RESULT_PATH,
    MessageRef,
    UploadReceipt,
)

OCTET_STREAM = "application/octet-stream"


class StepHttpError(Exception):
    """A 4xx answer: `status`, the server's error `code` and its `message` naming the problem."""

    status = 400

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class StepUnauthorized(StepHttpError):
    status = 401


class StepForbidden(StepHttpError):
    status = 403


class StepNotFound(StepHttpError):
    status = 404


class StepConflict(StepHttpError):
    """409: a conflicting duplicate, a replayed sequence, a stale round, or a step the server lost
    (`code == StepGraphMissing.code`: retry the step from its forward with new sequence numbers)."""

    status = 409


class StepPayloadTooLarge(StepHttpError):
    status = 413


class StepRejectedPayload(StepHttpError):
    """422: an authentic message that does not fit the job (dtype, shape, limits)."""

    status = 422


class StepServerUnavailable(Exception):
    """Connection errors or 5xx answers persisted through every retry."""


class StepCertificateError(Exception):
    """The server's TLS certificate failed verification: raised at once, as no retry fixes a wrong CA."""


def certificate_failure(exc: BaseException) -> str | None:
    """The TLS error when `exc` (or what caused it) is a certificate verification failure, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


_ERRORS: dict[int, type[StepHttpError]] = {
    kind.status: kind
    for kind in (
        StepUnauthorized,
        StepForbidden,
        StepNotFound,
        StepConflict,
        StepPayloadTooLarge,
        StepRejectedPayload,
    )
}

STEP_GRAPH_MISSING = StepGraphMissing.code
UPLOAD_NOT_FOUND = UploadNotFound.code


class StepClient:
    """One agent's connection to the control plane; use as a context manager or call `close()`."""

    def __init__(
        self,
        base_url: str,
        credential: str,
        ca_cert: str | Path | None = None,
        *,
        request_timeout_s: float = 30.0,
        max_retries: int = 6,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        verify: Any = str(ca_cert) if ca_cert is not None else True
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + API_PREFIX,
            # The protocol header lets the backend answer 426 to an agent of another protocol version.
            headers={"Authorization": f"Bearer {credential}", PROTOCOL_HEADER: PROTOCOL_VERSION},
            verify=verify,
            timeout=request_timeout_s,
            transport=transport,
        )
        self.request_timeout_s = request_timeout_s
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.bytes_up = 0
        self.bytes_down = 0

    def __enter__(self) -> StepClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- the four operations ---------------------------------------------------------------------

    def upload(self, ref: MessageRef, sealed: bytes) -> UploadReceipt:
        """PUT a sealed activations/gradients message (201 stored, 200 identical duplicate)."""
        response = self._request("PUT", _message_path(STEP_MESSAGE_PATH, ref), content=sealed)
        self.bytes_up += len(sealed)
        return UploadReceipt.model_validate(response.json())

    def wait_result(self, ref: MessageRef, timeout_s: float) -> bytes:
        """The sealed result of the upload at `ref` (long-polls until it exists); TimeoutError after
        `timeout_s`; `StepConflict` at once when the server refused the step."""
        return self._long_poll(_message_path(STEP_RESULT_PATH, ref), timeout_s)

    def upload_adapters(
        self, job_id: int, round_number: int, sealed: bytes, example_count: int
    ) -> UploadReceipt:
        """PUT this client's sealed round-end adapters with the example count FedAvg weighs them by."""
        path = CLIENT_ADAPTERS_PATH.format(job_id=job_id, round_number=round_number)
        response = self._request("PUT", path, content=sealed, params={"example_count": example_count})
        self.bytes_up += len(sealed)
        return UploadReceipt.model_validate(response.json())

    def get_adapters(self, job_id: int, round_number: int, timeout_s: float) -> bytes:
        """The round's FedAvg'd client adapters sealed for this client (long-polls until FedAvg is done)."""
        return self._long_poll(
            CLIENT_ADAPTERS_PATH.format(job_id=job_id, round_number=round_number), timeout_s
        )

    # ---- plumbing ----------------------------------------------------------------------------------

    def _long_poll(self, path: str, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no result at {path} within {timeout_s} s")
            wait_s = min(remaining, MAX_LONG_POLL_S)
            response = self._request(
                "GET", path, params={"wait_s": f"{wait_s:.3f}"}, timeout=wait_s + self.request_timeout_s
            )
            if response.status_code == 200:
                self.bytes_down += len(response.content)
                return response.content
            # 204: the server waited `wait_s` in vain; ask again at once (no client-side sleep loop).

    def _request(
        self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Content-Type": OCTET_STREAM} if "content" in kwargs else None
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(
                    method, path, headers=headers, timeout=timeout or self.request_timeout_s, **kwargs
                )
            except httpx.TransportError as exc:
                if reason := certificate_failure(exc):
                    raise StepCertificateError(
                        f"the server's certificate could not be verified ({reason})"
                    ) from None
                failure: str = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response
                if response.status_code < 500:
                    raise _http_error(response)
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
            if attempt == self.max_retries:
                raise StepServerUnavailable(f"{method} {path} failed {attempt + 1} times; last: {failure}")
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            time.sleep(random.uniform(delay / 2, delay))  # jitter: agents that failed together spread out
        raise AssertionError("unreachable")


def _message_path(template: str, ref: MessageRef) -> str:
    return template.format(
        job_id=ref.job_id,
        round_number=ref.round_number,
        step=ref.step,
        direction=ref.direction.value,
        sequence=ref.sequence,
    )


def api_error_fields(response: httpx.Response) -> tuple[str, str]:
    """The `(code, message)` of the API's error body; `http_<status>` and the raw text for anything else."""
    code, message = f"http_{response.status_code}", response.text[:500]
    try:
        body = response.json()
        code, message = str(body["error"]["code"]), str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    return code, message


def _http_error(response: httpx.Response) -> StepHttpError:
    code, message = api_error_fields(response)
    return _ERRORS.get(response.status_code, StepHttpError)(response.status_code, code, message)
