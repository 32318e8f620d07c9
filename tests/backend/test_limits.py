"""Body limits (413, also for streamed bodies, without buffering), 422 naming the field, 429, pagination."""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from apps.server import create_server_app
from backend.limits import TokenBucketLimiter
from backend.settings import Settings
from tests.support.control_plane import ADMIN_TOKEN, Api, LiveServer, enroll, job_spec

LIMIT = 64 * 1024  # the `settings` fixture's max_body_bytes


def _job_count(api: Api) -> int:
    total: int = api.ok("GET", "/jobs")["total"]
    return total


def test_declared_oversize_body_is_413_with_the_error_shape(api: Api) -> None:
    spec = job_spec([], hyperparameters={"blob": "x" * (LIMIT + 1)})
    response = api.post("/jobs", json=spec)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert _job_count(api) == 0


@contextmanager
def raw_tls(live_server: LiveServer) -> Iterator[ssl.SSLSocket]:
    """A TLS socket to the live server, to write requests byte by byte (chunks sent or withheld)."""
    host, port = "localhost", int(live_server.base_url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(live_server.tls.ca_cert))
    with (
        socket.create_connection((host, port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        yield tls


def read_error_response(tls: ssl.SSLSocket) -> bytes:
    """The raw response up to the end of its JSON error body (or the connection's end)."""
    response = b""
    while b"}}" not in response:
        more = tls.recv(65536)
        if not more:
            break
        response += more
    return response


def test_streamed_oversize_body_is_refused_before_it_ends(live_server: LiveServer) -> None:
    """Chunked upload over TLS: the 413 arrives while the body is still open, so nothing buffered it all."""
    with raw_tls(live_server) as tls:
        head = (
            "POST /api/v1/jobs HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        tls.sendall(head.encode())
        chunk = b"x" * 8192
        sent = 0
        # Never send the terminating chunk. Send past the limit first (a readable socket before that may be
        # just a TLS 1.3 session ticket), then give the server a moment per chunk to answer: it should,
        # long before 50x the limit.
        while sent < 50 * LIMIT:
            if sent > LIMIT and select.select([tls], [], [], 0.2 if sent > 2 * LIMIT else 0)[0]:
                break
            try:
                tls.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
                break  # the server answered and closed; read the answer below
            sent += len(chunk)
        response = read_error_response(tls)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b'"body_too_large"' in response
    assert sent < 50 * LIMIT  # the server answered long before we would have stopped
    with live_server.client() as client:
        assert _job_count(Api(client)) == 0


def test_malformed_json_and_wrong_types_are_422_naming_the_field(api: Api) -> None:
    audit_before = api.ok("GET", "/audit")["total"]
    broken = api.post("/jobs", content=b'{"name": "x", ', headers={"Content-Type": "application/json"})
    assert broken.status_code == 422
    assert broken.json()["error"]["code"] == "validation_error"
    assert "JSON" in broken.json()["error"]["message"]

    wrong = api.post("/jobs", json=job_spec([], rounds="many", parallel_mode="telepathy"))
    assert wrong.status_code == 422
    message = wrong.json()["error"]["message"]
    assert "body.rounds" in message and "body.parallel_mode" in message

    inconsistent = api.post("/jobs", json=job_spec([], replicas=4, parallel_mode="client_batch"))
    assert inconsistent.status_code == 422 and "replicas" in inconsistent.json()["error"]["message"]
    unknown = api.post("/jobs", json=job_spec(["nobody-enrolled"]))
    assert unknown.status_code == 422 and "nobody-enrolled" in unknown.json()["error"]["message"]

    bad_query = api.get("/jobs", params={"limit": 0})
    assert bad_query.status_code == 422 and "query.limit" in bad_query.json()["error"]["message"]
    # Nothing was half-written by any of the rejected requests (the unknown-client job rolled back too).
    assert _job_count(api) == 0
    assert api.ok("GET", "/audit")["total"] == audit_before


def test_unknown_route_and_method_have_the_error_shape(api: Api) -> None:
    assert api.get("/nope").json()["error"]["code"] == "not_found"
    assert api.request("DELETE", "/jobs").json()["error"]["code"] == "method_not_allowed"


def test_pagination(api: Api) -> None:
    ids = [api.ok("POST", "/jobs", 201, json=job_spec([], name=f"job-{i}"))["id"] for i in range(5)]
    first = api.ok("GET", "/jobs", params={"limit": 2})
    second = api.ok("GET", "/jobs", params={"limit": 2, "offset": 2})
    last = api.ok("GET", "/jobs", params={"limit": 2, "offset": 4})
    assert first["total"] == 5 and (first["limit"], first["offset"]) == (2, 0)
    pages = [j["id"] for page in (first, second, last) for j in page["items"]]
    assert pages == sorted(ids, reverse=True)


def test_auth_and_enrollment_are_rate_limited(settings: Settings) -> None:
    limited = settings.model_copy(update={"rate_limit_burst": 3, "rate_limit_per_minute": 1.0})
    with TestClient(create_server_app(limited)) as client:
        api = Api(client)
        statuses = [
            api.as_(None).post("/agent/enroll", json={"token": "x", "public_key": "y"}).status_code
            for _ in range(5)
        ]
        assert statuses[:3] == [422, 422, 422] and statuses[3:] == [429, 429]
        refused = api.get("/auth/me")
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limited"
        # Other endpoints are not rate limited.
        assert api.get("/jobs").status_code == 200


def test_admin_token_is_generated_once_and_kept_private(settings: Settings, tmp_path: Path) -> None:
    fresh = settings.model_copy(update={"bootstrap_admin_token": "", "data_dir": tmp_path / "fresh"})
    token_file = tmp_path / "fresh" / "admin_token"
    with TestClient(create_server_app(fresh)) as client:
        secret = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600
        me = Api(client, secret).ok("GET", "/auth/me")
        assert (me["kind"], me["role"]) == ("token", "admin")
    token_file.unlink()
    with TestClient(create_server_app(fresh)):
        assert not token_file.exists()  # an admin exists already: nothing new is minted


def test_the_rate_limiter_forgets_refilled_buckets_and_never_grows_past_its_bound() -> None:
    """One bucket per client key: a stream of new keys (rotating IPs) must not grow the dict for ever."""
    limiter = TokenBucketLimiter(per_minute=60.0, burst=2, max_buckets=100)  # full again 2 s after last use
    for index in range(1000):
        assert limiter.acquire(f"10.0.{index // 256}.{index % 256}", now=index * 0.1) == 0.0
        assert limiter.bucket_count() <= 100
    # Long after, every bucket has refilled: the next pruning (each max_buckets // 2 new keys) drops them all.
    for index in range(50):
        assert limiter.acquire(f"10.9.0.{index}", now=1000.0) == 0.0
    assert limiter.bucket_count() == 50
    # A live bucket keeps its state through pruning: the same key is still limited.
    assert limiter.acquire("10.9.0.1", now=1000.0) == 0.0
    assert limiter.acquire("10.9.0.1", now=1000.0) > 0
    # At the bound, with every bucket still refilling, a new key waits instead of growing the dict.
    full = TokenBucketLimiter(per_minute=60.0, burst=2, max_buckets=4)
    for index in range(4):
        full.acquire(f"k{index}", now=0.0)
    assert full.acquire("k-new", now=0.5) > 0 and full.bucket_count() == 4


def forwarded_for_statuses(served: tuple[str, Path]) -> list[int]:
    """15 enrollments from this host, each claiming another address in X-Forwarded-For (default burst: 10)."""
    base_url, ca_cert = served
    with httpx.Client(base_url=base_url, verify=str(ca_cert)) as http:
        return [
            http.post(
                "/api/v1/agent/enroll",
                json={"token": "flglm_et_nope", "public_key": "B" * 43 + "="},
                headers={"X-Forwarded-For": f"203.0.113.{index}"},
            ).status_code
            for index in range(15)
        ]


def test_a_forged_forwarded_for_does_not_dodge_the_rate_limit(served: tuple[str, Path]) -> None:
    """`flglm serve` believes X-Forwarded-For only from FLGLM_TRUSTED_PROXIES (none by default): a client on
    the host rotating that header used to get a fresh bucket on every request."""
    statuses = forwarded_for_statuses(served)
    assert 429 in statuses and statuses[-1] == 429, statuses


@pytest.mark.parametrize("served_env", [{"FLGLM_TRUSTED_PROXIES": "127.0.0.1"}])
def test_a_trusted_proxy_forwards_each_clients_own_address(served: tuple[str, Path]) -> None:
    """Behind a configured proxy each forwarded address has its own bucket: none of the 15 is limited."""
    assert forwarded_for_statuses(served) == [401] * 15


def test_an_anonymous_body_is_refused_before_a_byte_of_it_is_read(live_server: LiveServer) -> None:
    """FastAPI parses a JSON body before the route's dependencies run: anonymous megabytes used to be read
    and parsed (then a 422). Now the 401 comes with the body's first chunk still unanswered-for."""
    with raw_tls(live_server) as tls:
        head = (
            "POST /api/v1/jobs HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        tls.sendall(head.encode() + b'8\r\n{"name":\r\n')  # then nothing: the body never ends
        response = read_error_response(tls)
    assert response.startswith(b"HTTP/1.1 401"), response[:200]
    assert b'"missing_credential"' in response
    with live_server.client() as client:
        http = Api(client)
        forged = http.as_("flglm_at_forged").post(
            "/jobs", content=b"x" * 4096, headers={"content-type": "application/json"}
        )
        assert forged.status_code == 401 and forged.json()["error"]["code"] == "invalid_credential"
        enroll = http.as_(None).post(
            "/agent/enroll", json={"token": "flglm_et_x", "public_key": "B" * 43 + "="}
        )
        assert enroll.status_code == 401  # the anonymous route still reads its body: a bad enrollment token
        assert _job_count(http) == 0


def test_a_body_request_looks_its_credential_up_once(api: Api, app: FastAPI) -> None:
    """`AuthenticateFirst` checks the credential before the body is read and hands the principal on: the
    route's dependencies do not query it a second time."""
    agent = enroll(api, "counted")
    lookups: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "WHERE clients.credential_hash" in statement:  # the credential lookup, not a read of the row
            lookups.append(statement)

    sa.event.listen(app.state.engine, "before_cursor_execute", count)
    try:
        agent.api.ok("POST", "/agent/heartbeat", json={})
    finally:
        sa.event.remove(app.state.engine, "before_cursor_execute", count)
    assert len(lookups) == 1, lookups


def test_the_request_thread_pool_is_the_configured_size(settings: Settings) -> None:
    """FLGLM_REQUEST_THREADS sizes the threads sync routes run on (anyio's default 40 deadlocked 200 agents on
    the database pool in `flglm bench load`)."""
    import anyio.to_thread

    with TestClient(create_server_app(settings.model_copy(update={"request_threads": 77}))) as client:
        assert client.portal is not None
        size = client.portal.call(lambda: anyio.to_thread.current_default_thread_limiter().total_tokens)
    assert size == 77
