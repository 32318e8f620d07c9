"""The operator's side of a generation session over HTTPS: open, body calls, close (`flglm generate`).

One `httpx` connection for the whole session; paths and the tensor media type come from
`flglm.generation_protocol`, the tensor encoding from `flglm.generation` (`RemoteBody(client.run_body)`).
An API error raises `GenerationApiError` with the server's code and message.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType

import httpx

from flglm.generation_protocol import (
    GENERATION_BODY_PATH,
    GENERATION_SESSION_PATH,
    GENERATION_SESSIONS_PATH,
    TENSORS_MEDIA_TYPE,
    GenerationSessionView,
)
from flglm.protocol import API_PREFIX
from flglm.step_client import api_error_fields


class GenerationApiError(RuntimeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_error:
        raise GenerationApiError(response.status_code, *api_error_fields(response))


class GenerationSessionClient:
    """A job's generation session on the server; use as a context manager so the session is closed."""

    def __init__(
        self, server: str, token: str, job_id: int, ca_cert: Path | None = None, timeout_s: float = 180.0
    ) -> None:
        verify: str | bool = str(ca_cert) if ca_cert else True
        self.job_id = job_id
        self.http = httpx.Client(
            base_url=server.rstrip("/") + API_PREFIX,
            verify=verify,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {token}"},
        )
        self.session: GenerationSessionView | None = None

    def open(self) -> GenerationSessionView:
        response = self.http.post(GENERATION_SESSIONS_PATH.format(job_id=self.job_id))
        _raise_for_error(response)
        self.session = GenerationSessionView.model_validate(response.json())
        return self.session

    def _session_path(self, template: str) -> str:
        if self.session is None:
            raise RuntimeError("open the generation session first")
        return template.format(job_id=self.job_id, session_id=self.session.session_id)

    def run_body(self, data: bytes) -> bytes:
        """A `BodyTransport`: encoded body input in, encoded body output out."""
        response = self.http.post(
            self._session_path(GENERATION_BODY_PATH),
            content=data,
            headers={"Content-Type": TENSORS_MEDIA_TYPE},
        )
        _raise_for_error(response)
        return response.content

    def close(self) -> None:
        """Close the session on the server (one the worker already dropped is fine) and the connection."""
        try:
            if self.session is not None:
                response = self.http.delete(self._session_path(GENERATION_SESSION_PATH))
                if response.status_code != 404:
                    _raise_for_error(response)
                self.session = None
        finally:
            self.http.close()

    def __enter__(self) -> GenerationSessionClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if error is None:
            self.close()
            return
        with contextlib.suppress(GenerationApiError, httpx.HTTPError):  # keep the original error
            self.close()
