"""A whole deployment as real processes, for fault injection: `flglm serve` on PostgreSQL with Celery,
`flglm worker`s, `flglm agent run`s, a TCP proxy that can cut an agent off, and a private `redis-server`.

Every piece can be killed and restarted on the same port and data directory, like an operator's
supervisor would; the tests in tests/e2e/test_faults.py script the faults.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from flglm.contracts.dispatch import CeleryDispatcher
from flglm.contracts.tasks import REPLICA_COUNTERS
from flglm.step_protocol import replica_queue
from tests.support.agent_processes import wait_until
from tests.support.control_plane import Api, free_port

REPO = Path(__file__).resolve().parents[2]
ADMIN = "flglm_at_fault-test-admin"


@dataclass
class ServeProcess:
    """`flglm serve --self-signed` with `FLGLM_EXECUTOR=celery`; `kill()` SIGKILLs it, `start()` restarts it
    on the same port and data directory (same CA, server key, job keys and database)."""

    data_dir: Path
    database_url: str
    redis_url: str
    log_dir: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    @property
    def server_key_file(self) -> Path:
        return self.data_dir / "server_x25519.key"

    def log_path(self, start: int) -> Path:
        return self.log_dir / f"serve-{start}.log"

    def start(self, timeout: float = 60) -> float:
        """Start it and wait for /health; returns the seconds it took to come up."""
        began = time.monotonic()
        env = {
            **os.environ,
            "FLGLM_EXECUTOR": "celery",
            "FLGLM_DATABASE_URL": self.database_url,
            "FLGLM_REDIS_URL": self.redis_url,
            "FLGLM_BOOTSTRAP_ADMIN_TOKEN": ADMIN,
            "FLGLM_DEADLINE_CHECK_INTERVAL_S": "1",
            "FLGLM_RATE_LIMIT_BURST": "10000",
            "FLGLM_RATE_LIMIT_PER_MINUTE": "60000",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            **self.env,
        }
        self.starts += 1
        log = open(self.log_path(self.starts), "wb")  # noqa: SIM115
        args = [sys.executable, "-m", "apps.cli.main", "serve", "--self-signed", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*args, "--data-dir", str(self.data_dir)],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def healthy() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            if not self.ca_cert.exists():
                return False
            try:
                answer = httpx.get(f"{self.base_url}/api/v1/health", verify=str(self.ca_cert), timeout=2)
            except httpx.HTTPError:
                return False
            return answer.status_code == 200

        wait_until(healthy, timeout, "flglm serve to answer /health")
        return time.monotonic() - began

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path(self.starts).read_text(errors="replace")[-chars:]

    def api(self) -> Api:
        """A fresh admin client (a new pool: the old one may hold connections to a dead process)."""
        return Api(httpx.Client(base_url=self.base_url, verify=str(self.ca_cert), timeout=30), ADMIN)


def replica_counters(redis_url: str, job_id: int, load: bool = True) -> dict[str, Any]:
    """The worker's step counters of replica 0 of the job (`server_steps`, the `applied` step keys)."""
    dispatcher = CeleryDispatcher(redis_url)
    try:
        kwargs = {"job_id": job_id, "replica": 0, "load": load}
        return dispatcher.submit(REPLICA_COUNTERS, kwargs, replica_queue(0)).get(60)
    finally:
        dispatcher.close()


def flushed_redis_db(redis_url: str, db: int) -> str:
    """`redis_url` on database `db`, emptied (queues, blobs and results of earlier runs)."""
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


class CuttableProxy:
    """A TCP proxy (TLS passes through untouched) to `127.0.0.1:upstream_port`. `cut()` closes every open
    connection and resets new ones at once (the agent sees connection errors); `restore()` forwards again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_off = threading.Event()
        self.refused = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"https://localhost:{self.port}"  # the backend's certificate names localhost
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            if self.cut_off.is_set():
                self.refused += 1
                _reset(downstream)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                _reset(downstream)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {downstream, upstream}
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._open.discard(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> None:
        self.cut_off.set()
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            _reset(sock)

    def restore(self) -> None:
        self.cut_off.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a dropped link or a refusing firewall would look. The shutdown
    wakes a pump thread blocked in recv() on it (a bare close() would not, and the link would stay up)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class PrivateRedis:
    """A `redis-server` of this test alone on a free port (no persistence), restartable on that port."""

    def __init__(self, log_dir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.binary, self.log_dir = binary, log_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"redis-{self.starts}.log", "wb")  # noqa: SIM115
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        self.process = subprocess.Popen([*args, "no"], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def pong() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_until(pong, 20, "the private redis-server to answer PING")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
