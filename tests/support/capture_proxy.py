"""A plaintext HTTP reverse proxy that records every byte an agent sends, forwarding to the HTTPS backend."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HOP_HEADERS = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding", "keep-alive"}


class CaptureProxy:
    """`url` is what the agent is given; `requests` holds each request's raw line, headers and body."""

    def __init__(self, upstream: str, ca_cert: Path) -> None:
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._upstream = httpx.Client(base_url=upstream, verify=str(ca_cert), timeout=120)
        proxy = self

        class Forwarder(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                raw = self.requestline.encode() + b"\r\n" + self.headers.as_bytes() + body
                with proxy._lock:
                    proxy.requests.append(raw)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                try:
                    answer = proxy._upstream.request(self.command, self.path, headers=headers, content=body)
                except httpx.HTTPError:
                    self.send_error(502)
                    return
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-encoding":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Forwarder)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def captured(self) -> bytes:
        with self._lock:
            return b"\n".join(self.requests)

    def request_lines(self) -> list[str]:
        with self._lock:
            return [raw.split(b"\r\n", 1)[0].decode() for raw in self.requests]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()
